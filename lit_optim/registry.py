"""The optimizer registry: every name lit_optim can build, with lookup, listing and description.

Specs are declared in `lit_optim/specs/` (one module per backend, each a `SPECS` list) and registered here when
this module is imported. To add an optimizer, add an `OptimizerSpec` there and a YAML in `conf/optim/` (a test
checks the two match one to one); `register` adds one at run time.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from lit_optim.builders.construct import requirement_problem
from lit_optim.errors import UnknownOptimizerError, UnsupportedOptimizerError
from lit_optim.hf_names import OUT_OF_SCOPE
from lit_optim.spec import OptimizerSpec
from lit_optim.specs.all import SPECS as DECLARED

_SPECS: dict[str, OptimizerSpec] = {}
_ALIASES: dict[str, str] = {}
# Names users know (Hugging Face Trainer) whose backend lit_optim does not wrap: name -> why / what to use instead.
_UNSUPPORTED: dict[str, str] = dict(OUT_OF_SCOPE)


def register(spec: OptimizerSpec) -> OptimizerSpec:
    """Add a name at run time (the declared ones are in `lit_optim/specs/`)."""
    for name in spec.names:
        if name in _SPECS or name in _ALIASES:
            raise ValueError(f"optimizer name {name!r} is registered twice")
    _SPECS[spec.name] = spec
    for alias in spec.aliases:
        _ALIASES[alias] = spec.name
    return spec


for _spec in DECLARED:
    register(_spec)


def get_spec(name: str) -> OptimizerSpec:
    """The spec for a name or alias; unknown names fail with the closest valid ones."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key in _SPECS:
        return _SPECS[key]
    if key in _UNSUPPORTED:
        raise UnsupportedOptimizerError(f"Optimizer {name!r} is not available in lit_optim: {_UNSUPPORTED[key]}")
    raise UnknownOptimizerError(str(name), [*_SPECS, *_ALIASES])


def all_specs() -> list[OptimizerSpec]:
    return list(_SPECS.values())


def list_optimizers(pattern: str | None = None) -> list[str]:
    """Registered names (not aliases), sorted; `pattern` is a shell-style filter such as ``"*8bit*"``."""
    names = sorted(_SPECS)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def aliases() -> dict[str, str]:
    return dict(_ALIASES)


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""


def availability(spec: OptimizerSpec) -> Availability:
    """Whether `spec` can run on this machine, and if not, why (without importing heavy backends)."""
    problem = requirement_problem(spec)
    return Availability(True) if problem is None else Availability(False, problem[1])
