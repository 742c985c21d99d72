"""The optimizer registry: every name lit_optim can build, with lookup, listing and description.

Specs live in `lit_optim/specs/` (one module per backend); importing that package registers them. To add an
optimizer, add an `OptimizerSpec` there and a YAML in `conf/optim/` (a test checks the two match one to one).
"""

from __future__ import annotations

import fnmatch
import importlib.util
from dataclasses import dataclass

from lit_optim.errors import (
    BackendNotInstalledError,
    DeviceRequirementError,
    LitOptimError,
    UnknownOptimizerError,
    UnsupportedOptimizerError,
)
from lit_optim.hf_names import OUT_OF_SCOPE
from lit_optim.spec import CPU, OptimizerSpec

_SPECS: dict[str, OptimizerSpec] = {}
_ALIASES: dict[str, str] = {}
# Names users know (Hugging Face Trainer) whose backend lit_optim does not wrap: name -> why / what to use instead.
_UNSUPPORTED: dict[str, str] = dict(OUT_OF_SCOPE)


def register(spec: OptimizerSpec) -> OptimizerSpec:
    for name in spec.names:
        if name in _SPECS or name in _ALIASES:
            raise ValueError(f"optimizer name {name!r} is registered twice")
    _SPECS[spec.name] = spec
    for alias in spec.aliases:
        _ALIASES[alias] = spec.name
    return spec


def _ensure_loaded() -> None:
    if not _SPECS:
        import lit_optim.specs.all  # noqa: F401  (registers every spec)


def get_spec(name: str) -> OptimizerSpec:
    """The spec for a name or alias; unknown names fail with the closest valid ones."""
    _ensure_loaded()
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key in _SPECS:
        return _SPECS[key]
    if key in _UNSUPPORTED:
        raise UnsupportedOptimizerError(f"Optimizer {name!r} is not available in lit_optim: {_UNSUPPORTED[key]}")
    raise UnknownOptimizerError(str(name), [*_SPECS, *_ALIASES])


def all_specs() -> list[OptimizerSpec]:
    _ensure_loaded()
    return list(_SPECS.values())


def list_optimizers(pattern: str | None = None) -> list[str]:
    """Registered names (not aliases), sorted; `pattern` is a shell-style filter such as ``"*8bit*"``."""
    _ensure_loaded()
    names = sorted(_SPECS)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def aliases() -> dict[str, str]:
    _ensure_loaded()
    return dict(_ALIASES)


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""


def requirement_problem(spec: OptimizerSpec) -> tuple[type[LitOptimError], str, str] | None:
    """What keeps `spec` from running here, as (error type, short reason, full message with the fix), or None.

    The one place these checks live: `availability` shows the short reason, `build.check_available` raises.
    """
    if importlib.util.find_spec(spec.backend_module) is None:
        return (BackendNotInstalledError, f"{spec.backend} not installed: {spec.install_hint}",
                f"Optimizer {spec.name!r} needs the {spec.backend!r} package, which is not installed. Install it "
                f"with: {spec.install_hint}")
    if spec.requires_cuda or CPU not in spec.supports:
        import torch

        if not torch.cuda.is_available():
            return (DeviceRequirementError, "needs a CUDA GPU",
                    f"Optimizer {spec.name!r} runs only on a CUDA GPU and this machine has none. Train on a GPU, or "
                    "pick a CPU-capable optimizer (`lit-optim list` shows which).")
        have = torch.cuda.get_device_capability()
        if spec.min_compute_capability and have < spec.min_compute_capability:
            need = ".".join(map(str, spec.min_compute_capability))
            return (DeviceRequirementError, f"needs compute capability >= {need}",
                    f"Optimizer {spec.name!r} needs CUDA compute capability >= {need} (FP8: Ada or Hopper); this "
                    f"GPU ({torch.cuda.get_device_name()}) is {have[0]}.{have[1]}. Use an 8-bit optimizer instead, "
                    "e.g. 'adamw_torch_8bit'.")
    return None


def availability(spec: OptimizerSpec) -> Availability:
    """Whether `spec` can run on this machine, and if not, why (without importing heavy backends)."""
    problem = requirement_problem(spec)
    return Availability(True) if problem is None else Availability(False, problem[1])
