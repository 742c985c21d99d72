"""GaLore (Zhao et al., 2024): gradient low-rank projection around any inner optimizer.

Every ``update_proj_gap`` steps the projector of a targeted weight is refreshed from the SVD of its current gradient
(top-``rank`` singular vectors on the side ``proj_type`` chooses); in between, the gradient is projected to R, the inner
optimizer (AdamW, 8-bit AdamW, Adafactor, ...) steps on R in the low-rank space, and its update is projected back and
scaled by ``scale``: W += scale * P U. The inner optimizer's moments live in the low-rank space: for an m x n weight
(m <= n, "std") GaLore keeps m*r projector elements plus the inner's state of an r x n tensor, instead of the inner's
state of m x n. Defaults are Hugging Face's: rank 128, update_proj_gap 200, scale 0.25, proj_type "std". The
singular vectors come from the Gram matrix's eigenvectors by default (``svd_method``; see projection.svd_factors).

Why not the galore-torch package: its 8-bit class passes removed bitsandbytes arguments positionally (they land in
``max_unorm``/``skip_zeros`` on bitsandbytes 0.50), and it keeps each projector as a Python object in the optimizer
state, which checkpoints cannot load with ``weights_only=True``. This one wraps any optimizer class or factory
(``inner=``; the registry names pass one built from a spec) and keeps the projector as plain tensors, so runs resume
exactly.
"""

from __future__ import annotations

import torch

from lit_optim.errors import HyperparameterError
from lit_optim.optimizers.lowrank import LowRankOptimizer
from lit_optim.optimizers.projection import SVD_METHODS, add_back_projection, svd_factors


class GaLore(LowRankOptimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        rank: int = 128,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        svd_method: str = "gram_eigh",
        *,
        inner=torch.optim.AdamW,
        inner_kwargs=None,
        targets=None,
        fp32_state_params=(),
    ) -> None:
        if svd_method not in SVD_METHODS:
            raise HyperparameterError(f"svd_method must be one of {', '.join(SVD_METHODS)}; got {svd_method!r}.")
        defaults = {"lr": lr, "weight_decay": weight_decay, "rank": int(rank), "update_proj_gap": int(update_proj_gap),
                    "scale": float(scale), "proj_type": proj_type, "svd_method": svd_method}
        super().__init__(params, defaults, inner=inner, inner_kwargs=inner_kwargs, targets=targets,
                         fp32_state_params=fp32_state_params)

    def _factors(self, p, group, grad, own, step, side):
        if step % int(group["update_proj_gap"]) == 0 or not any(k in own for k in ("proj_left", "proj_right")):
            left, right = svd_factors(grad, group["rank"], side, group["svd_method"])
            for key, value in (("proj_left", left), ("proj_right", right)):
                if value is not None:
                    own[key] = value
        return own.get("proj_left"), own.get("proj_right")

    def _apply(self, p, group, grad, projected, update, left, right, side, own) -> None:
        # The shadow started at zero, so `update` is the inner optimizer's whole step (learning rate included).
        add_back_projection(p, update, left, right, alpha=float(group["scale"]))
