"""A compiled function that a later process loads instead of compiling again.

A warm start through Inductor's caches (FX graph + AOT autograd) still traces the function with
dynamo in every new process; on the H200 that tracing and the cache lookups were about 4.5 s of an
8-9 s engine start (benchmarks/results/warm_start_qwen3-0.6b_h200_2026-12-01.json). torch's AOT
precompile (``torch.compile(fn, fullgraph=True).aot_compile((args, kwargs))``, then
``save_compiled_function`` / ``torch.compiler.load_compiled_function``) stores the traced bytecode,
its guards and the compiled graph in one file, so the later process skips the trace.

:class:`PersistentCompile` wraps one function: the first call of each variant ("b1", "dyn" for a
symbolic batch, or "bN" for one static batch) loads ``<dir>/<key digest>-<variant>.pt2`` if it is
there, else compiles from the call's own arguments and saves it. The file's name digests everything
that decides the compiled code (torch / Triton versions, the device, this package's source, the
options, the model's shape); torch's guards (shapes, strides, dtypes, grad mode) are still checked
on every call, and a file that fails them, or fails to load, is compiled again and replaced, never
used. Where torch cannot precompile the function (``aot_compile`` raises: an older torch's gaps,
Inductor's caches switched off), it is compiled the ordinary way for this process only (logged;
``fallback`` says why). The files are compile caches in the user cache dir: the tuning database
holds no compiled artifacts.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

log = logging.getLogger(__name__)

#: the environment switch: "0" turns persistent compiles off (plain torch.compile)
ENV_SWITCH = "COMPILEPASS_PRECOMPILE"
SUFFIX = ".pt2"


def _aot_compile_on():
    """``torch._dynamo.config.enable_aot_compile`` on for the ``torch.compile`` calls inside: torch
    attaches ``aot_compile`` to a compiled function only with it (off by default in torch 2.11,
    on in 2.13); a torch without the option gets a no-op."""
    if hasattr(torch._dynamo.config, "enable_aot_compile"):
        return torch._dynamo.config.patch(enable_aot_compile=True)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def supported() -> bool:
    """Whether this torch has the AOT precompile API (torch >= 2.10: ``aot_compile`` on a compiled
    function, with ``enable_aot_compile`` on, and ``torch.compiler.load_compiled_function``)."""
    with _aot_compile_on():
        fn = torch.compile(lambda x: x, fullgraph=True)
    return hasattr(torch.compiler, "load_compiled_function") and hasattr(fn, "aot_compile")


def enabled() -> bool:
    """:func:`supported` and not switched off (``COMPILEPASS_PRECOMPILE=0``)."""
    return os.environ.get(ENV_SWITCH, "1") != "0" and supported()


def default_dir() -> Path:
    """``<compilepass cache dir>/precompiled`` (``COMPILEPASS_CACHE_DIR`` moves it)."""
    from compilepass.core.paths import cache_dir

    return cache_dir() / "precompiled"


@functools.lru_cache(maxsize=None)
def source_digest(paths: tuple) -> str:
    """sha256 over the bytes of ``paths`` (a tuple, sorted here): an edit to the code that a compiled
    graph was traced from gives the file another name. Once per process per set of files (an engine
    asks for its layer and each sampler)."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _inductor_config_digest() -> str:
    """Inductor's global settings as a digest (``TORCHINDUCTOR_*`` environment variables land there):
    in AOT precompile mode torch leaves keying artifacts by them to the caller."""
    try:
        cfg = torch._inductor.config.save_config_portable()
    except Exception:  # private API: keyed by the torch version alone then
        return "unknown"
    return hashlib.sha256(repr(sorted((k, repr(v)) for k, v in cfg.items())).encode()).hexdigest()[:16]


def environment_key(device: torch.device) -> dict:
    """What, besides the function and its options, decides the compiled code or its guards: versions,
    the device (its index too: the tensor guards check it, and torchrun's ranks each have one), the
    thread count and matmul precision settings (global-state guards), Inductor's global settings."""
    key = {"torch": torch.__version__, "python": list(sys.version_info[:2]), "device": device.type,
           "threads": torch.get_num_threads(), "fp32_matmul": torch.get_float32_matmul_precision(),
           "inductor_config": _inductor_config_digest()}
    try:
        import triton

        key["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        key["index"] = idx
        key["gpu"] = torch.cuda.get_device_name(idx)
        key["capability"] = list(torch.cuda.get_device_capability(idx))
        key["tf32"] = [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32]
    return key


def _dynamo_marks(t: torch.Tensor) -> dict:
    """The tensor's dynamo mark attributes and (copies of) their values."""
    return {a: (set(v) if isinstance(v, set) else v) for a, v in vars(t).items() if "dynamo" in a}


def _restore_marks(t: torch.Tensor, marks: dict) -> None:
    for a in [a for a in vars(t) if "dynamo" in a]:
        if a not in marks:
            delattr(t, a)
    for a, v in marks.items():
        setattr(t, a, v)


def _guard_failure(fn, args: tuple) -> str:
    """The first failing guard's text, as far as this torch tells it."""
    try:
        info = fn._artifacts.guard_manager.check_verbose(fn.prepare_f_locals(*args))
        return "; ".join(getattr(info, "verbose_code_parts", []) or [str(info)])[:300]
    except Exception:  # private API: the reason is a courtesy
        return "unknown"


class PersistentCompile:
    """``fn(*prefix, *args)`` compiled with ``torch.compile(fn, fullgraph=True, **compile_kwargs)``,
    persisted per variant under ``directory``.

    ``dynamic_args``: the positions (in ``args``) of the tensors whose dim 0 is the batch (None there
    is skipped; they must come without dynamo marks: the marks are this class's job); with
    ``dynamic_batch`` they are marked dynamic in [2, ``max_batch``] for the trace (a batch of 1 is its
    own variant), else every batch is a static variant. ``key``: JSON-able facts that select the
    file (see :func:`environment_key`). ``loaded`` / ``compiled`` list the variants each way (for
    logs and tests)."""

    def __init__(self, fn: Callable, *, prefix: tuple = (), key: dict, directory: Path,
                 compile_kwargs: Optional[dict] = None, dynamic_args: Sequence[int] = (),
                 dynamic_batch: bool = False, max_batch: int = 1):
        self.fn, self.prefix = fn, tuple(prefix)
        self.directory = Path(directory)
        self.compile_kwargs = dict(compile_kwargs or {})
        self.dynamic_args = tuple(dynamic_args)
        self.dynamic_batch, self.max_batch = bool(dynamic_batch), int(max_batch)
        self.digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
        self._fns: dict[str, Callable] = {}
        self.loaded: list[str] = []
        self.compiled: list[str] = []
        self.fallback: Optional[str] = None  # why torch's AOT precompile was given up, if it was
        self.guard_misses: list[str] = []  # variants some call of which failed the guards (compiled plainly)
        self._plain: Optional[Callable] = None

    def path(self, variant: str) -> Path:
        return self.directory / f"{self.digest}-{variant}{SUFFIX}"

    def _batch_tensors(self, args: tuple) -> list:
        return [args[i] for i in self.dynamic_args if isinstance(args[i], torch.Tensor)]

    def variant(self, args: tuple) -> str:
        tensors = self._batch_tensors(args)
        batch = tensors[0].shape[0] if tensors else 0
        if self.dynamic_batch and batch >= 2:
            return "dyn"
        return f"b{batch}"

    def __call__(self, *args):
        name = self.variant(args)
        fn = self._fns.get(name)
        if fn is None:
            fn = self._fns[name] = self._load(name, args) or self._compile(name, args)
        full = (*self.prefix, *args)
        try:
            return fn(*full)
        except RuntimeError:
            # A precompiled function checks its guards before it runs anything and raises where plain
            # torch.compile would compile again (LoRA on some layers only, a thread count or autocast
            # changed since): such calls take the ordinary compile; other errors propagate.
            if fn is self._plain_call or fn.guard_check(*full):
                raise
        if name not in self.guard_misses:
            self.guard_misses.append(name)
            log.info("precompiled %s: guards fail on a call (%s); such calls compile the ordinary way", name,
                     _guard_failure(fn, full))
        return self._plain_call(*full)

    def _load(self, name: str, args: tuple) -> Optional[Callable]:
        """The saved variant, if it is there, loads, and passes its guards on ``args``; else None."""
        path = self.path(name)
        if not path.exists():
            return None
        try:
            # loading sets the graph up under Inductor's global config (CUDA graphs or not, e.g.), not
            # under the options it was compiled with: load under those options
            with open(path, "rb") as f, self._options_config():
                fn = torch.compiler.load_compiled_function(f)
            if not fn.guard_check(*self.prefix, *args):
                raise RuntimeError(f"its guards fail on these inputs: {_guard_failure(fn, self.prefix + args)}")
        except Exception as exc:  # a stale or foreign file: compile again and replace it
            log.warning("precompiled %s not used (%s: %s); compiling again", path.name, type(exc).__name__,
                        (str(exc).splitlines() or [""])[0][:200])
            return None
        self.loaded.append(name)
        return fn

    def _compile(self, name: str, args: tuple) -> Callable:
        """Trace and compile on ``args`` (batch marked dynamic for "dyn"), then save. The marks are
        taken off again: a loaded function's guards expect unmarked tensors, and so does this one."""
        if self.fallback is not None:
            return self._plain_call
        marked = []
        if name == "dyn":
            for t in self._batch_tensors(args):
                marked.append((t, _dynamo_marks(t)))
                torch._dynamo.mark_dynamic(t, 0, min=2, max=self.max_batch)
        try:
            with _aot_compile_on():
                wrapper = torch.compile(self.fn, fullgraph=True, **self.compile_kwargs)
            fn = wrapper.aot_compile((self.prefix + args, {}))
        except Exception as exc:  # this torch cannot precompile it: compile as usual, in this process only
            self.fallback = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
            log.warning("AOT precompile failed (%s); compiling without saving", self.fallback)
            return self._plain_call
        finally:
            for t, marks in marked:
                _restore_marks(t, marks)
        self.compiled.append(name)
        path = self.path(name)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fn.save_compiled_function(str(tmp))  # then renamed: another process never reads half a file
            os.replace(tmp, path)
        except Exception as exc:  # e.g. an unpicklable closure: usable here, compiled again next time
            tmp.unlink(missing_ok=True)
            log.warning("could not save the precompiled %s (%s: %s)", name, type(exc).__name__,
                        (str(exc).splitlines() or [""])[0][:200])
        return fn

    def _options_config(self):
        """Inductor's config patched with this function's compile options (a no-op without any)."""
        options = self.compile_kwargs.get("options")
        if not options:
            return contextlib.nullcontext()
        return torch._inductor.config.patch(dict(options))

    def _plain_call(self, *full):
        """The fallback: one ordinary ``torch.compile`` for every variant, the batch marked per call as
        the engine's other compiles do (an error in its trace propagates as it would without us)."""
        if self._plain is None:
            self._plain = torch.compile(self.fn, fullgraph=True, **self.compile_kwargs)
        if not self.dynamic_batch:
            return self._plain(*full)
        marked = []
        for t in self._batch_tensors(full[len(self.prefix):]):
            if t.shape[0] >= 2:
                marked.append((t, _dynamo_marks(t)))
                torch._dynamo.mark_dynamic(t, 0, min=2, max=self.max_batch)
        try:
            return self._plain(*full)
        finally:  # a tensor this call marked, passed to the precompiled function later, would fail its guards
            for t, marks in marked:
                _restore_marks(t, marks)
