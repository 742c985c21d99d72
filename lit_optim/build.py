"""`build_optimizer`: name + hyperparameters -> the right optimizer object with the right param groups.

Order matters: everything that can be wrong with the request (name, backend, device, hyperparameters) is checked
before any optimizer is constructed, so errors arrive before step 1 and name the fix.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lit_optim.bnb_adapter import is_bnb
from lit_optim.builders.construct import (
    BuildContext,
    accepted_arguments,
    check_available,
    construct,
    embedding_params,
)
from lit_optim.builders.in_backward import build_in_backward, check_in_backward_options, in_backward_spec
from lit_optim.builders.offload import build_offloaded, check_offload_options
from lit_optim.builders.torchao_shards import decide_globally
from lit_optim.builders.values import check_quantized, check_rank, check_values
from lit_optim.compile_cache import prepare_for as prepare_compile_cache
from lit_optim.errors import HyperparameterError
from lit_optim.nesting import leaves
from lit_optim.param_groups import GroupPlan, build_param_groups
from lit_optim.plain_state import make_portable
from lit_optim.registry import get_spec
from lit_optim.schedule_free import switch_mode
from lit_optim.spec import OptimizerSpec

log = logging.getLogger("lit_optim")

# Keys that shape the param groups (or how the optimizer is stepped) rather than go to the optimizer's constructor.
# in_backward: step each parameter in its gradient hook (lit_optim/optimizers/in_backward.py); clip_per_param_norm
# is taken with it. offload/offload_gradients: state and step on the host (lit_optim/optimizers/offload.py).
GROUP_KEYS = ("no_decay", "lr_scales", "in_backward", "offload", "offload_gradients")


@dataclass
class BuildInfo:
    """What was actually built; attached to the optimizer as ``optimizer.lit_optim``."""

    name: str
    spec: OptimizerSpec
    hyperparameters: dict[str, Any]
    plan: GroupPlan
    embedding_32bit_params: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """A flat, loggable description of the built optimizer (for W&B config and the console)."""
        groups = [
            {"name": g["name"], "params": sum(p.numel() for p in g["params"]), "tensors": len(g["params"]),
             "weight_decay": g.get("weight_decay"), "lr_scale": g.get("lr_scale", 1.0)}
            for g in self.plan.groups
        ]
        block = self.hyperparameters.get("block_size")
        return {
            "name": self.name, "class": self.spec.target.replace(":", "."), "backend": self.spec.backend,
            "bits": self.spec.bits, "paged": self.spec.paged, "block_size": block,
            "theory_bytes_per_param": round(self.spec.bytes_per_param(self.hyperparameters), 4),
            "trainable_params": sum(g["params"] for g in groups), "groups": groups,
            "embedding_32bit_params": self.embedding_32bit_params,
            "hyperparameters": {k: v for k, v in self.hyperparameters.items()
                                if isinstance(v, (int, float, str, bool, tuple, type(None)))},
            **self.extra,
        }


def _plain(value: Any) -> Any:
    """OmegaConf containers to Python ones, lists to tuples: optimizer state must load with weights_only=True."""
    try:
        from omegaconf import Container, OmegaConf

        if isinstance(value, Container):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - hydra is a core dependency
        pass
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _check_type(spec: OptimizerSpec, key: str, value: Any, default: Any) -> Any:
    def bad(expected: str) -> HyperparameterError:
        return HyperparameterError(
            f"Optimizer {spec.name!r}: hyperparameter {key}={value!r} has the wrong type; expected {expected} "
            f"(default: {default!r})."
        )

    if default is inspect.Parameter.empty or default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
    elif isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
            raise bad("a number")
    elif isinstance(default, tuple):
        if not isinstance(value, tuple) or len(value) != len(default):
            raise bad(f"a list of {len(default)} values")
        if any(v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))) for v in value):
            raise bad(f"a list of {len(default)} numbers")
    elif isinstance(default, str) and not isinstance(value, str):
        raise bad("a string")
    return value


def resolve_hyperparameters(spec: OptimizerSpec, hyperparameters: Mapping[str, Any]) -> tuple[dict, dict]:
    """Split and validate: returns (optimizer kwargs, group options)."""
    hp = {k: _plain(v) for k, v in hyperparameters.items()}
    accepted = accepted_arguments(spec)
    group_opts = {k: hp.pop(k) for k in GROUP_KEYS if k in hp}
    if "in_backward" in group_opts:
        check_in_backward_options(spec, group_opts, hp)
    if "offload" in group_opts or "offload_gradients" in group_opts:
        check_offload_options(spec, group_opts)
    if spec.embedding_state_32bit:
        keep = hp.pop("embedding_state_32bit", True)
        if not isinstance(keep, bool):
            raise HyperparameterError(f"Optimizer {spec.name!r}: embedding_state_32bit must be true or false; got "
                                      f"{keep!r}.")
        group_opts["embedding_state_32bit"] = keep
    implied = dict(spec.fixed)
    if spec.backend == "bitsandbytes":  # the name fixes bits and paging even where the class takes them
        implied.update(optim_bits=spec.bits, is_paged=spec.paged)
    for key, value in hp.items():
        if key in implied and implied[key] != value:
            raise HyperparameterError(
                f"Optimizer {spec.name!r} fixes {key}={implied[key]!r}; it cannot be set to {value!r}. Pick the "
                f"name that means what you want (see `lit-optim list`)."
            )
        if key in implied:
            continue
        if key not in accepted:
            import difflib

            close = difflib.get_close_matches(key, list(accepted), n=2)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise HyperparameterError(
                f"Optimizer {spec.name!r} ({spec.target.replace(':', '.')}) does not take hyperparameter {key!r}.{hint}"
                f" It takes: {', '.join(sorted([*accepted, *GROUP_KEYS]))}."
            )
    kwargs = {**spec.defaults, **{k: v for k, v in hp.items() if k not in implied}}
    for key in list(kwargs):
        if key in accepted:
            kwargs[key] = _check_type(spec, key, kwargs[key], accepted[key])
    missing = [k for k, d in accepted.items()
               if d is inspect.Parameter.empty and k not in kwargs and k not in spec.fixed]
    if missing:
        raise HyperparameterError(f"Optimizer {spec.name!r} needs hyperparameter(s) {missing}; none were given.")
    check_values(spec, kwargs)  # the same ranges for every backend, before any constructor sees them
    return kwargs, group_opts


def _kept_32bit(optimizer: torch.optim.Optimizer, fp32: tuple[torch.Tensor, ...]) -> int:
    """Elements whose state was kept at 32 bits by request: only 8-bit bitsandbytes optimizers quantize them."""
    if any(is_bnb(leaf) and leaf.args.optim_bits == 8 for leaf in leaves([optimizer])):
        return sum(p.numel() for p in fp32)
    return 0


def build_optimizer(
    model_or_named_params: nn.Module | Iterable[tuple[str, nn.Parameter]],
    name: str,
    *,
    original_shapes: Mapping[int, torch.Size] | None = None,
    **hyperparameters: Any,
) -> torch.optim.Optimizer:
    """Build the optimizer `name` for a model (or its named parameters) with lit_optim's param groups.

    Hyperparameters are the optimizer's own constructor arguments (``lr``, ``betas``, ``block_size`` ...) plus
    ``weight_decay`` (applied only to the ``decay`` group), ``no_decay`` (extra regexes), ``lr_scales`` and, for
    bitsandbytes 8-bit optimizers, ``embedding_state_32bit`` (default True, as Hugging Face does).
    `original_shapes` is for a module inside an FSDP1 wrapper: `lit_optim.param_groups.fsdp1_shapes(wrapper)`.
    """
    spec = get_spec(name)
    check_available(spec)
    # torchao compiles its step per parameter shape; a persistent cache turns that into a load after the first run.
    prepare_compile_cache(spec, hyperparameters)
    kwargs, group_opts = resolve_hyperparameters(spec, hyperparameters)
    accepted = accepted_arguments(spec)
    lr = kwargs.get("lr", accepted.get("lr"))
    wd = kwargs.pop("weight_decay", accepted.get("weight_decay", 0.0))
    plan = build_param_groups(
        model_or_named_params,
        lr=float(lr) if lr is not None and lr is not inspect.Parameter.empty else 0.0,
        weight_decay=float(wd or 0.0),
        no_decay=group_opts.get("no_decay") or (),
        lr_scales=group_opts.get("lr_scales"),
        original_shapes=original_shapes,
    )
    if "weight_decay" in accepted:
        kwargs["weight_decay"] = wd or 0.0
    # The one decision on 32-bit state: every path below (plain, composite, offload, in backward) reads it here.
    fp32 = embedding_params(plan) if group_opts.get("embedding_state_32bit") else ()
    context = BuildContext(plan, lookup=get_spec, fp32_state_params=fp32)
    defaults = {**{k: v for k, v in accepted.items() if v is not inspect.Parameter.empty}, **spec.defaults}
    # The user's own settings: given and unlike the name's default (Hydra's YAML passes every default explicitly).
    chosen = {k for k, v in hyperparameters.items() if k not in defaults or _plain(v) != defaults[k]}
    check_quantized(spec, {**defaults, **kwargs}, [p for g in plan.groups for p in g["params"]],
                    user_keys=chosen, fp32=fp32)
    ctor_kwargs = {**kwargs, **spec.fixed}
    built_spec = spec
    if group_opts.get("offload"):
        optimizer, built_spec = build_offloaded(spec, plan.groups, ctor_kwargs, context,
                                                offload_gradients=group_opts["offload_gradients"])
    elif group_opts.get("in_backward"):
        optimizer = build_in_backward(plan.groups, spec, ctor_kwargs, context,
                                      clip_per_param_norm=group_opts.get("clip_per_param_norm"))
        built_spec = in_backward_spec(spec)
    else:
        optimizer = construct(spec, plan.groups, ctor_kwargs, context)  # checked against the name's claims
        if spec.backend == "torchao":  # FSDP2: one precision per parameter on every rank (pytorch/ao#4912)
            decide_globally(optimizer)
    check_rank(spec, optimizer, user_keys=chosen)
    info = BuildInfo(spec.name, built_spec, {**kwargs, "weight_decay": wd}, plan,
                     embedding_32bit_params=_kept_32bit(optimizer, fp32))
    if group_opts.get("offload"):
        info.extra["offload"] = group_opts["offload"]
        info.extra["offload_gradients"] = group_opts["offload_gradients"]
    elif built_spec is not spec:
        info.extra["in_backward"] = True
    optimizer.lit_optim = info
    if spec.train_eval_switch and callable(getattr(optimizer, "train", None)):
        # Ready to step, and to be resumed into before step 1: Lightning loads a sharded checkpoint's optimizer state
        # before any hook could switch it (see lit_optim.schedule_free).
        switch_mode(optimizer, train=True)
    # torchao's state subclasses go into checkpoints as plain tensors: loadable anywhere with no import first.
    make_portable(optimizer)
    log.info("lit_optim built %s (%s): %s", spec.name, spec.target.replace(":", "."), plan.summary())
    return optimizer
