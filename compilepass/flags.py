"""The flag space: which Inductor options we search, checked against the running torch.

A flag is an option of ``torch._inductor.config`` addressed by its dotted name (``"triton.multi_kernel"``).
The registry below is declarative: a name, the values worth trying, the devices where the option
matters, and (optionally) another flag it only makes sense with. At run time a :class:`FlagSpace`
keeps the options that exist in the running torch (others are excluded with a log line), reads
torch's own defaults, and applies :data:`KNOWN_BAD` gates for the running torch / Triton / vLLM.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from compilepass.core.env import EnvironmentKey, current_environment
from compilepass.core.errors import UnknownFlagError

log = logging.getLogger("compilepass.flags")

CUDA = frozenset({"cuda"})
ANY_DEVICE = frozenset({"cuda", "cpu"})


@dataclass(frozen=True)
class FlagSpec:
    """One Inductor option worth searching."""

    name: str
    choices: tuple
    devices: frozenset = ANY_DEVICE
    requires: Optional[tuple] = None  # (other flag, value) this one only matters with
    help: str = ""


@dataclass(frozen=True)
class FlagGate:
    """A known-bad setting or combination, limited to the versions where it is bad.

    ``vllm`` is None for gates that hold for any engine; a specifier string ("" for every version)
    makes the gate apply only when the flags go to vLLM's compiler (``engine="vllm"``).
    """

    when: Mapping[str, Any]
    reason: str
    source: str
    torch: str = ""
    triton: str = ""
    vllm: Optional[str] = None
    devices: frozenset = ANY_DEVICE

    def applies(self, flags: Mapping[str, Any], env: EnvironmentKey, engine: str = "native") -> bool:
        if any(flags.get(k, _MISSING) != v for k, v in self.when.items()):
            return False
        if env.device_kind not in self.devices:
            return False
        if not _version_in(env.torch, self.torch):
            return False
        if self.triton and not _version_in(env.triton, self.triton):
            return False
        if self.vllm is not None:
            if engine != "vllm" or env.vllm is None or not _version_in(env.vllm, self.vllm):
                return False
        return True


_MISSING = object()


def _version_in(version: Optional[str], spec: str) -> bool:
    if not spec:
        return True
    if version is None:
        return False
    try:
        v = Version(version.split("+")[0])
    except InvalidVersion:
        return False
    return SpecifierSet(spec).contains(v, prereleases=True)


BOOL = (False, True)

#: The options we search. Order is the order of the Optuna parameters.
REGISTRY: tuple[FlagSpec, ...] = (
    FlagSpec("triton.cudagraphs", BOOL, CUDA,
             help="run compiled graphs under CUDA graphs (cudagraph trees); removes launch overhead"),
    FlagSpec("combo_kernels", BOOL, CUDA,
             help="horizontally fuse independent kernels into one launch"),
    FlagSpec("benchmark_combo_kernel", BOOL, CUDA, requires=("combo_kernels", True),
             help="benchmark combo kernels against separate kernels before choosing"),
    FlagSpec("triton.multi_kernel", (0, 1), CUDA,
             help="generate persistent and looped reduction variants, pick the faster at run time"),
    FlagSpec("coordinate_descent_tuning", BOOL, CUDA,
             help="coordinate-descent search over Triton block sizes per kernel"),
    FlagSpec("max_autotune", BOOL, ANY_DEVICE,
             help="benchmark GEMM/conv templates and pointwise configs (long compile)"),
    FlagSpec("max_autotune_pointwise", BOOL, CUDA,
             help="autotune pointwise/reduction kernel configs only"),
    FlagSpec("max_autotune_gemm", BOOL, CUDA,
             help="autotune GEMM templates only"),
    FlagSpec("epilogue_fusion", BOOL, ANY_DEVICE,
             help="fuse pointwise epilogues into matmul templates"),
    FlagSpec("aggressive_fusion", BOOL, ANY_DEVICE,
             help="fuse nodes even without shared memory reads"),
    FlagSpec("shape_padding", BOOL, ANY_DEVICE,
             help="pad matmul shapes to aligned sizes"),
    FlagSpec("size_asserts", BOOL, ANY_DEVICE,
             help="check tensor sizes and strides on entry to compiled graphs"),
    FlagSpec("split_reductions", BOOL, ANY_DEVICE,
             help="split large reductions into two kernels for parallelism"),
)

#: Known-bad settings. Each entry names its versions, reason and source. Version bounds are what the
#: sources document; where a fix release is unknown the bound stays open.
KNOWN_BAD: tuple[FlagGate, ...] = (
    FlagGate(
        when={"freezing": True},
        reason="freezing bakes parameters into the graph as constants; compilepass updates LoRA weights "
               "in place between rollouts, so a frozen graph would generate with stale weights",
        source="torch/_inductor/config.py (freezing); compilepass invariant 'one copy of the weights'",
    ),
    FlagGate(
        when={"combo_kernels": True},
        devices=frozenset({"cpu"}),
        reason="combo kernels are Triton-only; the C++ (CPU) scheduler fails on them",
        source="https://github.com/pytorch/pytorch/issues/167780",
    ),
    FlagGate(
        when={"triton.multi_kernel": 1, "cpp_wrapper": True},
        torch="<2.3",
        reason="multi-kernel code generation did not support the C++ wrapper before the two-pass codegen",
        source="https://github.com/pytorch/pytorch/pull/117813",
    ),
    FlagGate(
        when={"cpp_wrapper": True, "triton.cudagraphs": True},
        torch="<2.7",
        reason="CUDA graphs were forced off / broken with the C++ wrapper",
        source="https://github.com/pytorch/pytorch/issues/130878",
    ),
    FlagGate(
        when={"triton.cudagraphs": True},
        vllm=">0.11.0",
        reason="vLLM captures its own CUDA graphs; Inductor's cudagraph trees inside it fail with "
               "'These storage data ptrs are not allocated in pool'",
        source="unslothai/unsloth-zoo unsloth_zoo/vllm_utils.py (inductor_compile_config for compilation_config=3)",
    ),
    FlagGate(
        when={"combo_kernels": True},
        vllm=">0.11.0",
        torch=">2.9.0",
        reason="combo kernels failed in vLLM's compile with \"'NullKernelHandler' object has no attribute "
               "'index_to_str'\"",
        source="unslothai/unsloth-zoo unsloth_zoo/vllm_utils.py (inductor_compile_config for compilation_config=3)",
    ),
    FlagGate(
        when={"triton.multi_kernel": 1},
        vllm="",
        reason="multi-kernel code failed in vLLM's compiled graphs with \"name 'multi_kernel_0' is not defined\" "
               "(the AOT-style wrapper path; see pytorch#131035)",
        source="unslothai/unsloth-zoo unsloth_zoo/vllm_utils.py; https://github.com/pytorch/pytorch/issues/131035",
    ),
)


class FlagSpace:
    """The searchable options for one device and one running torch."""

    def __init__(
        self,
        device_kind: Optional[str] = None,
        env: Optional[EnvironmentKey] = None,
        registry: Iterable[FlagSpec] = REGISTRY,
        gates: Iterable[FlagGate] = KNOWN_BAD,
        include: Optional[Iterable[str]] = None,
        exclude: Iterable[str] = (),
        inductor_config: Optional[Mapping[str, Any]] = None,
        engine: str = "native",
    ):
        self.env = env or current_environment()
        self.engine = engine
        self.device_kind = device_kind or self.env.device_kind
        self.gates = tuple(gates)
        torch_options = inductor_config if inductor_config is not None else inductor_options()
        registry = tuple(registry)
        known = {s.name for s in registry}
        for name in list(include or ()) + list(exclude):
            if name not in known:
                raise UnknownFlagError(_unknown_message(name, sorted(known)))
        self.excluded: dict[str, str] = {}
        self.torch_defaults: dict[str, Any] = {}
        specs = []
        for spec in registry:
            if include is not None and spec.name not in include:
                self.excluded[spec.name] = "not in --flags"
            elif spec.name in exclude:
                self.excluded[spec.name] = "excluded by the caller"
            elif spec.name not in torch_options:
                self.excluded[spec.name] = f"torch {self.env.torch} has no such Inductor option"
                log.info("flag %s excluded: %s", spec.name, self.excluded[spec.name])
            elif self.device_kind not in spec.devices:
                self.excluded[spec.name] = f"no effect on {self.device_kind}"
            else:
                specs.append(spec)
                self.torch_defaults[spec.name] = torch_options[spec.name]
        self.specs: tuple[FlagSpec, ...] = tuple(specs)
        self._all_options = dict(torch_options)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def spec(self, name: str) -> FlagSpec:
        for s in self.specs:
            if s.name == name:
                return s
        raise UnknownFlagError(_unknown_message(name, self.names))

    def defaults(self) -> dict[str, Any]:
        """torch's own values for every searchable option (the baseline)."""
        return dict(self.torch_defaults)

    def validate(self, flags: Mapping[str, Any]) -> dict[str, Any]:
        """Check that every option exists in the running torch and has a value of the right type."""
        out = {}
        for name, value in flags.items():
            if name not in self._all_options:
                raise UnknownFlagError(_unknown_message(name, self.names))
            default = self._all_options[name]
            if default is not None and not _same_kind(value, default):
                raise UnknownFlagError(
                    f"flag {name!r} takes a {type(default).__name__} (torch default {default!r}), got {value!r}"
                )
            out[name] = value
        return out

    def violations(self, flags: Mapping[str, Any]) -> list[FlagGate]:
        return [g for g in self.gates if g.applies(flags, self.env, self.engine)]

    def filter_unsafe(self, flags: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """Drop options the running torch lacks or that a gate marks unsafe. Returns (kept, dropped->reason)."""
        kept = {}
        dropped = {}
        for name, value in flags.items():
            if name not in self._all_options:
                dropped[name] = f"torch {self.env.torch} has no such Inductor option"
            else:
                kept[name] = value
        for gate in self.violations(kept):
            for name in gate.when:
                if name in kept:
                    dropped[name] = f"{gate.reason} (source: {gate.source})"
                    del kept[name]
        return kept, dropped

    def effective(self, flags: Mapping[str, Any]) -> dict[str, Any]:
        """The flags that differ from torch's defaults, with inactive dependent flags removed."""
        out = {}
        for name, value in flags.items():
            spec = next((s for s in self.specs if s.name == name), None)
            if spec is not None and spec.requires is not None:
                other, needed = spec.requires
                if flags.get(other, self._all_options.get(other)) != needed:
                    continue
            if self._all_options.get(name, _MISSING) != value:
                out[name] = value
        return out

    def describe(self) -> list[dict]:
        rows = []
        for s in REGISTRY:
            rows.append({
                "name": s.name,
                "choices": list(s.choices),
                "torch_default": self._all_options.get(s.name, None),
                "available": s.name in self.names,
                "why_not": self.excluded.get(s.name, ""),
                "help": s.help,
            })
        return rows


def inductor_options() -> dict[str, Any]:
    """All option names and current values of the running torch's ``torch._inductor.config``."""
    import torch._inductor.config as inductor_config

    return dict(inductor_config.get_config_copy())


def parse_flag_assignments(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``name=value`` strings from the command line (values: true/false/ints/floats/strings)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise UnknownFlagError(f"expected NAME=VALUE, got {item!r}")
        name, raw = item.split("=", 1)
        out[name.strip()] = _parse_value(raw.strip())
    return out


def _parse_value(raw: str) -> Any:
    low = raw.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def _same_kind(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def _unknown_message(name: str, valid: list[str]) -> str:
    return f"unknown flag {name!r}; valid flags: {', '.join(valid)}"


def inductor_options_for_torch(options: Optional[dict]) -> dict:
    """Options as torch.compile wants them: JSON has no tuples, Inductor's tuple options need them."""
    import torch._inductor.config as inductor_config  # heavy: imports torch

    current = inductor_config.get_config_copy()
    out = {}
    for name, value in (options or {}).items():
        if isinstance(value, list) and isinstance(current.get(name), tuple):
            value = tuple(value)
        out[name] = value
    return out
