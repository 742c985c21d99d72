"""APOLLO and APOLLO-Mini (Zhu et al., 2024): SGD-like memory, AdamW-like updates, on GaLore's machinery.

A seeded Gaussian matrix (variance 1/r, regenerated from a stored seed; a new seed every ``update_proj_gap`` steps)
projects the gradient G to R. AdamW moments are kept for R only (the inner optimizer, stepped with lr 1 so its update
is the normalised direction R~). Their ratio estimates AdamW's learning-rate scaling: per channel (the dimension that is
not projected) s_j = ||R~_j|| / ||R_j||, or one factor per tensor (APOLLO-Mini, rank 1). The weight then takes an
SGD-like step on the *raw* gradient, scaled: W -= lr * sqrt(scale) * G * s, with the norm-growth limiter of Fira
(the scaled gradient's norm may grow by at most ``norm_growth_limit`` per step). As in the reference implementation
the update is multiplied by sqrt(scale); APOLLO-Mini's customary scale is 128.

State per m x n target (m <= n, "std"): the inner moments of an r x n tensor and one scalar (the limiter's last norm);
the projection matrix itself is regenerated each step from its seed and never stored.

Why not the apollo-torch package: it is built on galore-torch's projector objects (checkpoints that do not load
with ``weights_only=True``) and offers AdamW only; here APOLLO shares lit_optim's GaLore machinery, so it
checkpoints, resumes exactly and runs in backward like every other name.
"""

from __future__ import annotations

import math

import torch

from lit_optim.errors import HyperparameterError
from lit_optim.optimizers.lowrank import LowRankOptimizer
from lit_optim.optimizers.projection import LEFT, initial_seed, next_seed, random_factors


class Apollo(LowRankOptimizer):
    _valid_proj_types = ("std", "reverse_std", "left", "right")

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        rank: int = 128,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        proj_type: str = "std",
        scale_type: str = "channel",
        norm_growth_limit: float = 1.01,
        seed: int = 0,
        *,
        inner=torch.optim.AdamW,
        inner_kwargs=None,
        targets=None,
        fp32_state_params=(),
    ) -> None:
        if scale_type not in ("channel", "tensor"):
            raise HyperparameterError(f"scale_type must be 'channel' or 'tensor'; got {scale_type!r}.")
        defaults = {"lr": lr, "weight_decay": weight_decay, "rank": int(rank), "update_proj_gap": int(update_proj_gap),
                    "scale": float(scale), "proj_type": proj_type, "scale_type": scale_type,
                    "norm_growth_limit": float(norm_growth_limit or 0.0), "seed": int(seed)}
        super().__init__(params, defaults, inner=inner, inner_kwargs=inner_kwargs, targets=targets,
                         fp32_state_params=fp32_state_params)

    def _inner_lr(self, group) -> float:
        return 1.0  # the inner step is the normalised direction; the real learning rate applies to the raw gradient

    def _factors(self, p, group, grad, own, step, side):
        if "proj_seed" not in own:
            own["proj_seed"] = initial_seed(group["seed"], self._target_index[id(p)])
        elif step % int(group["update_proj_gap"]) == 0:
            own["proj_seed"] = next_seed(own["proj_seed"])
        return random_factors(p.shape, group["rank"], side, own["proj_seed"], p.device)

    def _apply(self, p, group, grad, projected, update, left, right, side, own) -> None:
        eps = 1e-8
        if group["scale_type"] == "channel":
            # Channels are the dimension the projection keeps: columns for a left projection, rows for a right one.
            dim, shape = (0, (1, -1)) if side == LEFT else (1, (-1, 1))
            factor = (torch.linalg.vector_norm(update, dim=dim)
                      / (torch.linalg.vector_norm(projected, dim=dim) + eps)).view(shape)
            col_norms = torch.linalg.vector_norm(grad, dim=dim, dtype=torch.float32).view(shape)
            scaled_norm = torch.linalg.vector_norm(col_norms * factor)
        else:
            factor = torch.linalg.vector_norm(update) / (torch.linalg.vector_norm(projected) + eps)
            scaled_norm = torch.linalg.vector_norm(grad, dtype=torch.float32) * factor
        limit = float(group["norm_growth_limit"])
        if limit > 0:
            last = own.get("proj_last_norm")
            if last is None:
                own["proj_last_norm"] = scaled_norm.detach().clone()
            else:
                limiter = torch.clamp(scaled_norm / (last + eps), min=limit) / limit
                factor = factor / limiter
                own["proj_last_norm"] = scaled_norm / limiter
        factor = factor * math.sqrt(float(group["scale"]))
        p.addcmul_(grad, factor.to(p.dtype), value=-float(group["lr"]))
