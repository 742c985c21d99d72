"""One registry name's own optimizer: requirements, accepted arguments, construction, and the check of its claims."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lit_optim.bnb_adapter import isolate
from lit_optim.errors import (
    BackendNotInstalledError,
    DeviceRequirementError,
    HyperparameterError,
    LitOptimError,
)
from lit_optim.param_groups import GroupPlan, ParamInfo
from lit_optim.spec import CPU, OptimizerSpec, constructor_arguments


@dataclass
class BuildContext:
    """What a builder may need beyond groups and constructor arguments: the model's structure, the parameters whose
    state stays at 32 bits (bitsandbytes embeddings), and the registry lookup for names chosen by hyperparameter
    (GaLore's ``inner``), passed in so that builders never import the registry."""

    plan: GroupPlan
    lookup: Callable[[str], OptimizerSpec] | None = None
    fp32_state_params: tuple[torch.Tensor, ...] = field(default_factory=tuple)

    @property
    def param_info(self) -> dict[int, ParamInfo]:
        return self.plan.param_info

    @property
    def model(self) -> nn.Module | None:
        return self.plan.model

    def resolve(self, name_or_spec: str | OptimizerSpec) -> OptimizerSpec:
        if isinstance(name_or_spec, OptimizerSpec):
            return name_or_spec
        if self.lookup is None:
            raise LitOptimError(f"Optimizer name {name_or_spec!r} cannot be resolved here: build through "
                                "lit_optim.build_optimizer, or pass the spec itself.")
        return self.lookup(name_or_spec)


# Why a backend's names need a newer GPU, said with the compute capability they need.
_CAPABILITY_WHY = {"torchao": "FP8: Ada or Hopper", "flashoptim": "its Triton kernels: Ampere or newer"}


def requirement_problem(spec: OptimizerSpec) -> tuple[type[LitOptimError], str, str] | None:
    """What keeps `spec` from running here, as (error type, short reason, full message with the fix), or None.

    The one place these checks live: `registry.availability` shows the short reason, `check_available` raises.
    """
    import importlib.util

    # The machine first: installing a CUDA-only backend on a machine without a suitable GPU would not help.
    if spec.requires_cuda or CPU not in spec.supports:
        if not torch.cuda.is_available():
            return (DeviceRequirementError, "needs a CUDA GPU",
                    f"Optimizer {spec.name!r} runs only on a CUDA GPU and this machine has none. Train on a GPU, or "
                    "pick a CPU-capable optimizer (`lit-optim list` shows which).")
        have = torch.cuda.get_device_capability()
        if spec.min_compute_capability and have < spec.min_compute_capability:
            need = ".".join(map(str, spec.min_compute_capability))
            why = _CAPABILITY_WHY.get(spec.backend, "")
            return (DeviceRequirementError, f"needs compute capability >= {need}",
                    f"Optimizer {spec.name!r} needs CUDA compute capability >= {need}{f' ({why})' if why else ''}; "
                    f"this GPU ({torch.cuda.get_device_name()}) is {have[0]}.{have[1]}. Use an 8-bit optimizer "
                    "instead, e.g. 'adamw_torch_8bit'.")
    if importlib.util.find_spec(spec.backend_module) is None:
        return (BackendNotInstalledError, f"{spec.backend} not installed: {spec.install_hint}",
                f"Optimizer {spec.name!r} needs the {spec.backend!r} package, which is not installed. Install it "
                f"with: {spec.install_hint}")
    return None


def check_available(spec: OptimizerSpec) -> None:
    """Backend installed and device adequate, or a clear error saying what to do."""
    problem = requirement_problem(spec)
    if problem is not None:
        error, _, message = problem
        raise error(message)


def accepted_arguments(spec: OptimizerSpec) -> dict[str, Any]:
    """The hyperparameters a name takes, with defaults (``inspect.Parameter.empty`` if required).

    A spec whose arguments are more than its class's constructor (composites take their inner optimizer's too)
    declares ``arguments``; otherwise the class's constructor is scanned.
    """
    if spec.arguments is not None:
        args = dict(spec.arguments(spec))
    else:
        # bitsandbytes' `args` bundles the others; Muon's `param_info` comes from the model.
        args = constructor_arguments(spec.load_class(), ("args", "param_info"))
    if spec.embedding_state_32bit:
        args["embedding_state_32bit"] = True  # taken by the build itself (see build.py), never by a constructor
    return args


def verify(optimizer: torch.optim.Optimizer, spec: OptimizerSpec, ctor: Mapping[str, Any] | None = None) -> None:
    """The object must be what the name claims (class, bits, paging) -- the check timm's factory lacks -- and, where
    the bits are a hyperparameter (FlashOptim), what `ctor` (its constructor arguments) asked for."""
    cls = spec.load_class()
    if not isinstance(optimizer, cls):
        raise AssertionError(f"{spec.name!r} built {type(optimizer).__name__}, expected {cls.__name__}")
    if spec.backend == "bitsandbytes":
        bits = optimizer.args.optim_bits
        if bits != spec.bits or bool(optimizer.is_paged) != spec.paged:
            raise AssertionError(
                f"{spec.name!r} built bitsandbytes {type(optimizer).__name__} with optim_bits={bits}, "
                f"is_paged={optimizer.is_paged}; expected bits={spec.bits}, paged={spec.paged}"
            )
    if spec.backend == "flashoptim":
        from lit_optim.builders.flashoptim import check_built

        check_built(optimizer, spec, ctor or {})


def construct(spec: OptimizerSpec, groups: list[dict], kwargs: Mapping[str, Any], context: BuildContext | None = None,
              ) -> torch.optim.Optimizer:
    """`spec`'s optimizer over `groups` (constructor arguments: the spec's defaults, then `kwargs`, then what the name
    fixes), with bitsandbytes' override manager made private and verified against the name's claims.

    Every optimizer lit_optim builds from a name goes through here: top-level, or inside GaLore, in-backward and
    offload. Of ``context.fp32_state_params``, those in `groups` keep 32-bit state (bitsandbytes only).
    """
    ctor = {**spec.defaults, **dict(kwargs), **spec.fixed}
    if spec.backend == "optimi" and ctor.get("triton") is None \
            and not all(p.is_cuda for g in groups for p in g["params"]):
        # optimi takes its Triton step whenever Triton imports, even for CPU tensors (plain or offloaded host
        # copies), and Triton has no CPU driver ("0 active drivers"): keep those on optimi's torch path.
        ctor["triton"] = False
    try:
        if spec.builder is not None:
            opt = spec.builder(groups, spec, ctor, context)
        else:
            opt = spec.load_class()(groups, **ctor)
    except LitOptimError:
        raise
    except (ValueError, TypeError) as err:
        # What a backend's constructor refuses (its own range checks), said as ours: the name and the values.
        shown = {k: v for k, v in ctor.items() if not isinstance(v, (list, dict))}
        raise HyperparameterError(f"Optimizer {spec.name!r} ({spec.target.replace(':', '.')}) refused its "
                                  f"hyperparameters {shown}: {err}") from err
    mine = {id(p) for g in groups for p in g["params"]}
    isolate(opt, [p for p in (context.fp32_state_params if context else ()) if id(p) in mine])
    verify(opt, spec, ctor)
    return opt


def factory(spec: OptimizerSpec, kwargs: Mapping[str, Any], context: BuildContext | None = None,
            ) -> Callable[[list[dict]], torch.optim.Optimizer]:
    """``groups -> optimizer`` for `spec`: what the wrapper classes (GaLore, in-backward, offload) take as ``inner``."""

    def make(groups: list[dict], **more: Any) -> torch.optim.Optimizer:
        return construct(spec, groups, {**dict(kwargs), **more}, context)

    make.spec = spec  # type: ignore[attr-defined]  - what the wrapper records as its inner optimizer's name
    make.__name__ = spec.name
    return make


def embedding_params(plan: GroupPlan) -> tuple[torch.Tensor, ...]:
    return tuple(i.param for i in plan.param_info.values() if i.is_embedding)


__all__ = ["BuildContext", "accepted_arguments", "check_available", "construct", "embedding_params", "factory",
           "requirement_problem", "verify"]
