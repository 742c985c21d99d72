"""Registry names built from the model's structure: GaLore and APOLLO (which weights are projected, what steps the
projections) and Adam-mini (which rows share a second moment).

A fixed-inner name (``galore_adamw_8bit``) has its inner spec bound when the spec is declared
(`lit_optim/specs/lowrank_specs.py`); the generic ``galore`` takes the inner's name as a hyperparameter and resolves
it through the build context.
"""

from __future__ import annotations

from typing import Any

from lit_optim.builders.construct import BuildContext, accepted_arguments, check_available, factory
from lit_optim.errors import HyperparameterError
from lit_optim.optimizers.adam_mini import AdamMini, infer_partitions
from lit_optim.optimizers.projection import select_targets
from lit_optim.spec import OptimizerSpec, constructor_arguments

# Inner optimizers whose update depends on the parameter's value cannot step a zero-valued stand-in.
NOT_PROJECTABLE = {
    "adafactor_torch": "PyTorch's Adafactor scales its step by the parameter's RMS (zero for a projected stand-in); "
                       "use 'adafactor' (alias 'adafactor_hf', absolute lr) -- that is what 'galore_adafactor' uses",
    "lamb_8bit": "LAMB's trust ratio divides by the parameter's norm, which is zero for a projected stand-in",
}
# Arguments the builder supplies to the class: the model decides the targets and the 32-bit tensors.
_PLUMBING = ("inner", "inner_kwargs", "targets", "fp32_state_params")
_BUILDER_ARGUMENTS = {"target_modules": None}


def check_projectable(spec: OptimizerSpec) -> OptimizerSpec:
    reason = NOT_PROJECTABLE.get(spec.name)
    if reason is None and spec.train_eval_switch:
        reason = "schedule-free optimizers interpolate between parameter sequences, which a projection cannot keep"
    if reason is None and spec.builder is not None:
        reason = "it is itself a composite optimizer (projection, in-backward or a Muon/AdamW split)"
    if reason:
        raise HyperparameterError(f"{spec.name!r} cannot be the inner optimizer of a low-rank projection: {reason}.")
    return spec


def lowrank_arguments(spec: OptimizerSpec, inner: OptimizerSpec | None = None) -> dict[str, Any]:
    """A low-rank name's hyperparameters: the class's own, ``target_modules``, and either the bound inner's own
    arguments (``galore_adamw_8bit``: ``betas``, ``eps``...) or ``inner``/``inner_kwargs`` (generic ``galore``)."""
    own = {**constructor_arguments(spec.load_class(), _PLUMBING), **_BUILDER_ARGUMENTS}
    if inner is None:
        return {**own, "inner": "adamw_torch", "inner_kwargs": None}
    check_projectable(inner)
    check_available(inner)
    inner_args = {k: inner.defaults.get(k, v) for k, v in accepted_arguments(inner).items()
                  if k not in own and k not in ("optim_bits", "is_paged") and k not in inner.fixed}
    return {**own, **inner_args}


def lowrank_builder(groups, spec: OptimizerSpec, kwargs: dict, context: BuildContext | None, *,
                    inner: OptimizerSpec | None = None):
    """Resolve ``target_modules`` on the model, split own and inner hyperparameters, and construct the class with a
    factory of the inner spec."""
    kwargs = dict(kwargs)
    if inner is not None:
        kwargs.pop("inner", None)  # the name fixes it (kept in `fixed` for display)
    target_modules = kwargs.pop("target_modules", None)
    infos = list(context.param_info.values()) if context is not None else []
    targets = select_targets(infos, context.model if context is not None else None, target_modules)
    cls = spec.load_class()
    own_names = set(constructor_arguments(cls, _PLUMBING))
    own = {k: v for k, v in kwargs.items() if k in own_names}
    inner_hparams = {k: v for k, v in kwargs.items() if k not in own_names and k not in ("inner", "inner_kwargs")}
    if inner is None:
        if inner_hparams:
            raise HyperparameterError(
                f"{spec.name!r}: {sorted(inner_hparams)} are not its hyperparameters; give the inner optimizer's "
                "arguments as inner_kwargs={...}."
            )
        name = kwargs.get("inner", "adamw_torch")
        if context is None:
            raise HyperparameterError(f"{spec.name!r} chooses its inner optimizer by name; build it through "
                                      "lit_optim.build_optimizer.")
        inner = context.resolve(name)
        check_available(inner)
    check_projectable(inner)
    inner_kwargs = {**dict(kwargs.get("inner_kwargs") or {}), **inner_hparams}
    # Embeddings (never projected) keep 32-bit bitsandbytes state where the build decided so; a no-op for others.
    fp32 = tuple(context.fp32_state_params) if context is not None else ()
    return cls(groups, inner=factory(inner, {}), inner_kwargs=inner_kwargs, targets=targets, fp32_state_params=fp32,
               **own)


def adam_mini_arguments(spec: OptimizerSpec) -> dict[str, Any]:
    """Adam-mini's hyperparameters: the constructor's, less `partitions` (computed from the model)."""
    return constructor_arguments(spec.load_class(), ("partitions",))


def adam_mini_builder(groups, spec: OptimizerSpec, kwargs: dict, context: BuildContext | None) -> AdamMini:
    infos = list(context.param_info.values()) if context is not None else []
    partitions = infer_partitions(infos, context.model if context is not None else None,
                                  n_heads=kwargs.get("n_heads"), n_kv_heads=kwargs.get("n_kv_heads"),
                                  d_model=kwargs.get("d_model"), fused_qkv=kwargs.get("fused_qkv") or ())
    return AdamMini(groups, partitions=partitions, **kwargs)
