"""The machinery GaLore and APOLLO share: an inner registry optimizer stepping low-rank stand-ins of the weights.

For each targeted 2-D weight W (m x n) the inner optimizer holds a *shadow*: a tensor of the projected shape whose
value is zero at every step and whose ``.grad`` is set to the projected gradient R. After the inner step the shadow
holds the inner optimizer's update in the projected space; the subclass maps it back onto W (GaLore: project back and
scale; APOLLO: turn it into per-channel scaling of the raw gradient). Between steps the shadow's storage is released
(a one-element stride-0 view stands in), so shadows cost memory only while their own parameter steps.

Every target has its own inner optimizer (one parameter each): targets step one at a time, so at most one projected
gradient and one shadow exist at once, and the same objects serve optimizer-in-backward. Non-targeted parameters
(embeddings, head, norms, biases, 1-D) go to one more inner optimizer with their normal param groups -- weight decay
included. Weight decay of a target is decoupled and applied to the full weight (W *= 1 - lr * wd), never to the
shadow (whose inner groups have weight_decay 0).

The inner optimizer's state for a shadow *is* ``state[W]`` (see `composite.py`), plus the projector entries
(``proj_*``), so checkpoints, resume and state-bytes accounting see it under the real parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lit_optim.bnb_adapter import share_qmaps
from lit_optim.errors import HyperparameterError
from lit_optim.optimizers.composite import (
    CompositeOptimizer,
    as_groups,
    build_sub_optimizer,
    set_group_value,
)
from lit_optim.optimizers.projection import check_proj_type, project, projected_shape, projection_side
from lit_optim.spec import constructor_arguments

# Inner optimizers whose update depends on the parameter's value cannot step a zero-valued stand-in.
_NOT_PROJECTABLE = {
    "adafactor_torch": "PyTorch's Adafactor scales its step by the parameter's RMS (zero for a projected stand-in); "
                       "use 'adafactor' (alias 'adafactor_hf', absolute lr) -- that is what 'galore_adafactor' uses",
    "lamb_8bit": "LAMB's trust ratio divides by the parameter's norm, which is zero for a projected stand-in",
}


def check_projectable(spec) -> Any:
    reason = _NOT_PROJECTABLE.get(spec.name)
    if reason is None and spec.train_eval_switch:
        reason = "schedule-free optimizers interpolate between parameter sequences, which a projection cannot keep"
    if reason is None and spec.builder is not None:
        reason = "it is itself a composite optimizer (projection, in-backward or a Muon/AdamW split)"
    if reason:
        raise HyperparameterError(f"{spec.name!r} cannot be the inner optimizer of a low-rank projection: {reason}.")
    return spec


def _inner_spec(inner):
    from lit_optim.registry import get_spec

    return check_projectable(inner if hasattr(inner, "load_class") else get_spec(inner))


def _placeholder(shape, device) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float32, device=device).expand(*shape)


class LowRankOptimizer(CompositeOptimizer):
    """Base class; subclasses define the defaults, `_factors` (projection) and `_apply` (update of the weight)."""

    _valid_proj_types: tuple[str, ...] = ("std", "reverse_std", "left", "right", "full")

    def __init__(self, params, defaults: dict, *, inner="adamw_torch", inner_kwargs: Mapping[str, Any] | None = None,
                 targets: Mapping[int, int] | None = None, context=None, fp32_state_params=()) -> None:
        groups = as_groups(params)
        self.inner_spec = _inner_spec(inner)
        # "inner" (a name) rides along in every group: it says what steps the projected tensors.
        super().__init__(groups, {**defaults, "inner": self.inner_spec.name})
        for g in self.param_groups:
            check_proj_type(g["proj_type"], self._valid_proj_types)
            if int(g["rank"]) < 1 or int(g["update_proj_gap"]) < 1:
                raise HyperparameterError(f"rank and update_proj_gap must be >= 1; got {g['rank']}, "
                                          f"{g['update_proj_gap']}.")
        kwargs = {"lr": defaults["lr"], **dict(inner_kwargs or {})}
        params_all = self._params()
        if targets is None:
            targets = {id(p): i for i, p in enumerate(p for p in params_all if p.ndim == 2)}
        self._target_index = {id(p): int(targets[id(p)]) for p in params_all if id(p) in targets and p.ndim == 2}
        self._group_of: dict[int, int] = {}
        self._shadow: dict[int, torch.Tensor] = {}
        self._target_opt: dict[int, torch.optim.Optimizer] = {}
        self._pending: dict[torch.Tensor, dict] = {}
        fp32_ids = {id(p) for p in fp32_state_params}
        plain_groups = []
        for gi, g in enumerate(self.param_groups):
            plain = []
            for p in g["params"]:
                self._group_of[id(p)] = gi
                if id(p) not in self._target_index:
                    plain.append(p)
                    continue
                shadow = _placeholder(self.projected_shape(p, g), p.device)
                self._shadow[id(p)] = shadow
                self._target_opt[id(p)] = build_sub_optimizer(
                    self.inner_spec, [{"params": [shadow], "lr": self._inner_lr(g), "weight_decay": 0.0}], kwargs,
                    context)
            if plain:
                plain_groups.append({"params": plain, "lr": g["lr"], "weight_decay": g["weight_decay"],
                                     "name": g.get("name", f"group{gi}"), "wrapper_group": gi})
        self._plain = build_sub_optimizer(
            self.inner_spec, plain_groups, kwargs, context,
            fp32_state_params=[p for g in plain_groups for p in g["params"] if id(p) in fp32_ids],
        ) if plain_groups else None
        share_qmaps(self.lit_optim_inner_optimizers())

    # --- subclass interface -------------------------------------------------------------------------------------
    def _inner_lr(self, group: dict) -> float:
        return float(group["lr"])

    def _factors(self, p, group, grad, own: dict, step: int, side: str):
        raise NotImplementedError

    def _apply(self, p, group, grad, projected, update, left, right, side, own: dict) -> None:
        raise NotImplementedError

    # --- introspection --------------------------------------------------------------------------------------------
    @property
    def targets(self) -> list[torch.Tensor]:
        return [p for p in self._params() if id(p) in self._target_index]

    def is_target(self, p: torch.Tensor) -> bool:
        return id(p) in self._target_index

    def projected_shape(self, p: torch.Tensor, group: dict | None = None) -> tuple[int, int]:
        group = group or self.param_groups[self._group_of[id(p)]]
        return projected_shape(p.shape, group["rank"], projection_side(p.shape, group["proj_type"]))

    def inner_state_report(self) -> list[dict[str, Any]]:
        """Per target: shape, projected shape and the bytes its inner state really takes per projected element.

        bitsandbytes keeps 32-bit state below 4096 elements and torchao quantizes only tensors of >= 4096 elements
        divisible by its block size: projected shapes are small, so this says what precision the inner state got.
        """
        from lit_optim.state_bytes import state_bytes_by_param

        rows = []
        for p in self.targets:
            opt = self._target_opt[id(p)]
            inner_bytes = sum(state_bytes_by_param(opt).values())
            own = sum(v.untyped_storage().nbytes() for k, v in self.state.get(p, {}).items()
                      if k.startswith(self.own_prefix) and isinstance(v, torch.Tensor))
            shape = self.projected_shape(p)
            rows.append({"shape": tuple(p.shape), "projected_shape": shape, "projected_numel": shape[0] * shape[1],
                         "inner_bytes": inner_bytes - own,
                         "inner_bytes_per_element": (inner_bytes - own) / (shape[0] * shape[1]),
                         "projector_bytes": own})
        return rows

    # --- composite plumbing ---------------------------------------------------------------------------------------
    def _route(self, p):
        if id(p) in self._target_index:
            return self._target_opt[id(p)], self._shadow[id(p)]
        return self._plain, p

    def lit_optim_inner_optimizers(self) -> list[torch.optim.Optimizer]:
        return [*([self._plain] if self._plain is not None else []), *self._target_opt.values()]

    def _after_load(self) -> None:
        self._pending.clear()
        share_qmaps(self.lit_optim_inner_optimizers())

    # --- stepping -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._plain is not None and any(p.grad is not None for g in self._plain.param_groups for p in g["params"]):
            for g in self._plain.param_groups:
                outer = self.param_groups[g["wrapper_group"]]
                set_group_value(g, "lr", outer["lr"])
                g["weight_decay"] = outer["weight_decay"]
            self._plain.step()
            for g in self._plain.param_groups:
                for p in g["params"]:
                    self._link(p)
        for g in self.param_groups:
            for p in g["params"]:
                if id(p) in self._target_index and p.grad is not None:
                    self._step_target(p, g)
        return loss

    def _step_target(self, p: torch.Tensor, group: dict) -> None:
        own = self._own_state(p, self._pending)
        step = int(own.get("proj_step", 0))
        grad = p.grad
        side = projection_side(p.shape, group["proj_type"])
        left, right = self._factors(p, group, grad, own, step, side)
        projected = project(grad, left, right)
        shadow = self._shadow[id(p)]
        shadow.data = torch.zeros_like(projected)
        shadow.grad = projected
        opt = self._target_opt[id(p)]
        set_group_value(opt.param_groups[0], "lr", self._inner_lr(group))
        opt.step()
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        if wd:
            p.mul_(1.0 - lr * wd)
        self._apply(p, group, grad, projected, shadow.data, left, right, side, own)
        shadow.grad = None
        shadow.data = _placeholder(shadow.shape, p.device)
        own["proj_step"] = step + 1
        self._link(p, self._pending.pop(p, None))

    # --- registry integration -------------------------------------------------------------------------------------
    @classmethod
    def _own_arguments(cls) -> dict[str, Any]:
        return constructor_arguments(cls, ("targets", "context", "fp32_state_params"))

    @classmethod
    def accepted_arguments_for(cls, spec) -> dict[str, Any]:
        """Hyperparameters a registry name built on this class takes: its own plus its inner optimizer's."""
        from lit_optim.build import accepted_arguments, check_available
        from lit_optim.registry import get_spec

        own = cls._own_arguments()
        inner_name = spec.fixed.get("inner")
        if inner_name is None:  # generic name: the inner is chosen by hyperparameter, its arguments go in inner_kwargs
            return own
        inner_spec = check_projectable(get_spec(inner_name))
        check_available(inner_spec)
        own.pop("inner_kwargs", None)
        own.pop("inner", None)  # fixed by the name
        if not (inner_spec.backend == "bitsandbytes" and inner_spec.bits == 8):
            own.pop("embedding_state_32bit", None)
        inner_args = {k: v for k, v in accepted_arguments(inner_spec).items()
                      if k not in own and k not in ("optim_bits", "is_paged") and k not in inner_spec.fixed}
        for k, v in inner_spec.defaults.items():
            if k in inner_args:
                inner_args[k] = v
        return {**own, **inner_args}

    @classmethod
    def build(cls, groups, spec, kwargs: dict, context) -> LowRankOptimizer:
        """Spec builder: resolve `target_modules` on the model, split own and inner hyperparameters, construct."""
        from lit_optim.optimizers.projection import select_targets

        kwargs = dict(kwargs)
        target_modules = kwargs.pop("target_modules", None)
        keep_emb_32 = kwargs.pop("embedding_state_32bit", True)
        infos = list(context.param_info.values()) if context is not None else []
        targets = select_targets(infos, context.model if context is not None else None, target_modules)
        own_names = set(cls._own_arguments())
        own = {k: v for k, v in kwargs.items() if k in own_names}
        inner_hparams = {k: v for k, v in kwargs.items() if k not in own_names}
        if inner_hparams and "inner" not in spec.fixed:
            raise HyperparameterError(
                f"{spec.name!r}: {sorted(inner_hparams)} are not its hyperparameters; give the inner optimizer's "
                "arguments as inner_kwargs={...}."
            )
        inner_kwargs = {**dict(own.pop("inner_kwargs", None) or {}), **inner_hparams}
        inner = _inner_spec(own.pop("inner", "adamw_torch"))
        fp32 = [i.param for i in infos if i.is_embedding] if keep_emb_32 else []
        return cls(groups, inner=inner, inner_kwargs=inner_kwargs, targets=targets, context=context,
                   fp32_state_params=fp32, **own)
