"""lit_optim: memory-efficient optimizers for PyTorch Lightning, by name.

    >>> import lit_optim
    >>> lit_optim.list_optimizers("*8bit*")          # doctest: +SKIP
    >>> opt = lit_optim.build_optimizer(model, "paged_adamw_8bit", lr=2e-5)  # doctest: +SKIP
"""

from lit_optim.build import build_optimizer
from lit_optim.description import describe
from lit_optim.errors import (
    BackendNotInstalledError,
    DeviceRequirementError,
    HyperparameterError,
    IncompatibleConfigError,
    LitOptimError,
    UnknownOptimizerError,
    UnsupportedOptimizerError,
)
from lit_optim.hf_args import from_hf_training_args
from lit_optim.registry import get_spec, list_optimizers

__version__ = "0.1.0"

__all__ = [
    "BackendNotInstalledError",
    "DeviceRequirementError",
    "HyperparameterError",
    "IncompatibleConfigError",
    "LitOptimError",
    "OptimizerMixin",
    "UnknownOptimizerError",
    "UnsupportedOptimizerError",
    "build_optimizer",
    "callbacks",
    "compare",
    "describe",
    "estimate",
    "from_hf_training_args",
    "get_spec",
    "list_optimizers",
    "wandb_offline",
]


# Submodules reachable as attributes after a plain `import lit_optim` (`lit_optim.callbacks.default_monitors()`),
# imported on first use: the callbacks need Lightning, and `import lit_optim` stays light without it.
_LAZY_SUBMODULES = ("callbacks", "wandb_offline")


def __getattr__(name: str):
    # Lightning is imported only when the mixin is used, so `import lit_optim` stays light.
    if name == "OptimizerMixin":
        from lit_optim.mixin import OptimizerMixin

        return OptimizerMixin
    if name == "estimate":  # builds models on the meta device; imports the task's model code
        from lit_optim.memory_estimate import estimate

        return estimate
    if name == "compare":  # runs training processes: nothing of it is imported until used
        from lit_optim.comparison import compare

        return compare
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"lit_optim.{name}")
    raise AttributeError(f"module 'lit_optim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "OptimizerMixin", "compare", "estimate", *_LAZY_SUBMODULES])
