"""Registry names stepped in backward: ``<name>_layerwise`` and ``in_backward: true`` on any name.

The per-parameter sub-optimizers are the name's own optimizer (or a one-parameter GaLore/APOLLO), built through
`construct`, so each is checked against the name's claims like a top-level one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from lit_optim.builders.construct import BuildContext, accepted_arguments, construct
from lit_optim.errors import HyperparameterError
from lit_optim.optimizers.in_backward import IN_BACKWARD_SUPPORTS, InBackwardOptimizer
from lit_optim.spec import OptimizerSpec


def in_backward_spec(spec: OptimizerSpec) -> OptimizerSpec:
    """The spec of `spec` stepped in backward: same state theory, narrower support."""
    return dataclasses.replace(spec, supports=spec.supports & IN_BACKWARD_SUPPORTS)


def check_in_backward_base(spec: OptimizerSpec) -> None:
    if spec.train_eval_switch:
        raise HyperparameterError(
            f"{spec.name!r} is schedule-free: its train()/eval() parameter swap is not supported in backward; use it "
            "without in_backward."
        )
    if issubclass(spec.load_class(), InBackwardOptimizer):
        raise HyperparameterError(f"{spec.name!r} already steps in backward.")


def check_in_backward_options(spec: OptimizerSpec, group_opts: dict, hp: dict) -> None:
    """Validate ``in_backward`` (popped into `group_opts`) and move ``clip_per_param_norm`` there with it."""
    flag = group_opts["in_backward"]
    if not isinstance(flag, bool):
        raise HyperparameterError(f"in_backward must be true or false; got {flag!r}.")
    if issubclass(spec.load_class(), InBackwardOptimizer):
        if not flag:
            raise HyperparameterError(f"{spec.name!r} always steps in backward; in_backward=false is not possible "
                                      "(use the name without _layerwise).")
        group_opts.pop("in_backward")
        return
    if not flag:
        return
    check_in_backward_base(spec)
    if "clip_per_param_norm" in hp:
        clip = hp.pop("clip_per_param_norm")
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip <= 0):
            raise HyperparameterError(f"clip_per_param_norm must be a positive number; got {clip!r}.")
        group_opts["clip_per_param_norm"] = clip


def build_in_backward(groups, spec: OptimizerSpec, kwargs: Mapping[str, Any], context: BuildContext | None, *,
                      clip_per_param_norm=None) -> InBackwardOptimizer:
    """One `spec` optimizer per parameter (constructor arguments `kwargs`), stepped in backward."""
    check_in_backward_base(spec)
    kwargs = {k: v for k, v in kwargs.items() if k not in spec.fixed}

    def make_sub(group: dict) -> torch.optim.Optimizer:
        return construct(spec, [group], kwargs, context)

    lr = kwargs.get("lr", groups[0].get("lr", 1e-3) if groups else 1e-3)
    # "base" names the registry optimizer each parameter gets (the `_layerwise` names fix it).
    return InBackwardOptimizer(groups, make_sub, clip_per_param_norm=clip_per_param_norm,
                               defaults={"lr": lr, "base": spec.name})


def layerwise_builder(groups, spec: OptimizerSpec, kwargs: dict, context: BuildContext | None, *,
                      base: OptimizerSpec) -> InBackwardOptimizer:
    """Builder of the ``<name>_layerwise`` names: the base name (bound when the spec is declared) in backward."""
    kwargs = dict(kwargs)
    kwargs.pop("base", None)  # the name fixes it (kept in `fixed` for display)
    clip = kwargs.pop("clip_per_param_norm", None)
    return build_in_backward(groups, base, kwargs, context, clip_per_param_norm=clip)


def layerwise_arguments(spec: OptimizerSpec, *, base: OptimizerSpec) -> dict[str, Any]:
    """The base name's hyperparameters plus ``clip_per_param_norm``."""
    return {**accepted_arguments(base), "clip_per_param_norm": None}
