"""distray: LLM knowledge distillation at cluster scale on Ray.

    distray run jobs/configs/quickstart.yaml

Teacher generation (Ray Data + vLLM), student training (Ray Train + DeepSpeed ZeRO), evaluation,
serving (Ray Serve) and load benchmarks, driven by one typed config. Importing `distray` is cheap:
the public names below are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "__version__",
    "DistillationJob",
    "DistrayConfig",
    "load_config",
    "DistrayError",
    "ConfigError",
    "DataError",
]

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("distray")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# Public name → module that defines it; resolved lazily by __getattr__ (PEP 562).
_LAZY = {
    "DistrayConfig": "distray.config",
    "load_config": "distray.config",
    "DistrayError": "distray.errors",
    "ConfigError": "distray.errors",
    "DataError": "distray.errors",
    "DistillationJob": "distray.api",
}

if TYPE_CHECKING:
    from distray.api import DistillationJob
    from distray.config import DistrayConfig, load_config
    from distray.errors import ConfigError, DataError, DistrayError


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'distray' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
