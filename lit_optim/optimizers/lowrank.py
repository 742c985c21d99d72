"""The machinery GaLore and APOLLO share: an inner optimizer stepping low-rank stand-ins of the weights.

The inner optimizer is any ``inner(param_groups, **inner_kwargs) -> Optimizer``: an optimizer class
(``torch.optim.AdamW``, ``bitsandbytes.optim.AdamW8bit``) or a factory; lit_optim's registry names pass one built from
a spec (`lit_optim/builders/lowrank.py`). Nothing here knows the registry.

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

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from lit_optim.bnb_adapter import isolate, share_qmaps
from lit_optim.errors import HyperparameterError
from lit_optim.optimizers.composite import CompositeOptimizer, as_groups, set_group_value
from lit_optim.optimizers.projection import check_proj_type, project, projected_shape, projection_side

InnerFactory = Callable[..., torch.optim.Optimizer]  # (param_groups, **inner_kwargs) -> optimizer

def _placeholder(shape, device) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float32, device=device).expand(*shape)


class LowRankOptimizer(CompositeOptimizer):
    """Base class; subclasses define the defaults, `_factors` (projection) and `_apply` (update of the weight)."""

    _valid_proj_types: tuple[str, ...] = ("std", "reverse_std", "left", "right", "full")

    def __init__(self, params, defaults: dict, *, inner: InnerFactory = torch.optim.AdamW,
                 inner_kwargs: Mapping[str, Any] | None = None, targets: Mapping[int, int] | None = None,
                 fp32_state_params: Iterable[torch.Tensor] = ()) -> None:
        """`targets`: id(param) -> index (its projection seed) of the 2-D weights to project (default: every 2-D
        parameter); `fp32_state_params`: parameters whose bitsandbytes state stays at 32 bits."""
        groups = as_groups(params)
        if not callable(inner):
            raise HyperparameterError(f"inner must be an optimizer class or factory; got {inner!r} (registry names "
                                      "such as 'adamw_8bit' go through lit_optim.build_optimizer).")
        self.inner = inner
        # "inner" (a name) rides along in every group: it says what steps the projected tensors.
        super().__init__(groups, {**defaults, "inner": getattr(inner, "__name__", type(inner).__name__)})
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
                self._target_opt[id(p)] = self._make_inner(
                    [{"params": [shadow], "lr": self._inner_lr(g), "weight_decay": 0.0}], kwargs)
            if plain:
                plain_groups.append({"params": plain, "lr": g["lr"], "weight_decay": g["weight_decay"],
                                     "name": g.get("name", f"group{gi}"), "wrapper_group": gi})
        self._plain = self._make_inner(
            plain_groups, kwargs, [p for g in plain_groups for p in g["params"] if id(p) in fp32_ids],
        ) if plain_groups else None
        share_qmaps(self.lit_optim_inner_optimizers())

    def _make_inner(self, groups: list[dict], kwargs: Mapping[str, Any], fp32=()) -> torch.optim.Optimizer:
        opt = self.inner(groups, **kwargs)
        if isinstance(opt, CompositeOptimizer):
            raise HyperparameterError(f"{type(opt).__name__} cannot be the inner optimizer of a low-rank projection: "
                                      "it is itself a composite optimizer.")
        # One optimizer per target: bitsandbytes' process-wide override manager must not leak between them.
        isolate(opt, fp32)
        return opt

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
