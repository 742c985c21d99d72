"""LOMO and AdaLomo (Lv et al., 2023): the update fused into the backward pass, so gradients never all coexist.

- `Lomo`: plain SGD applied to each parameter as soon as its gradient is complete (no optimizer state).
- `AdaLomo`: Adafactor's factored second moment (row and column statistics of G² for a matrix) with grouped update
  normalisation: the update G/sqrt(v) is clipped to RMS <= clip_threshold and scaled by max(eps2, RMS(parameter)).

Both are `InBackwardOptimizer`s (see `in_backward.py` for how stepping in backward meets Lightning). The originals'
global-norm clipping needs a second backward pass; here ``clip_per_param_norm`` clips each parameter's gradient
instead, and fp16 loss scaling is not offered (use bf16).

Why not the lomo-optim package: its optimizers run their own backward (``fused_backward``) and so cannot sit under
Lightning's automatic optimization or its checkpoints; these are ordinary optimizers stepped from gradient hooks.
"""

from __future__ import annotations

import torch

from lit_optim.optimizers.adafactor import Adafactor
from lit_optim.optimizers.in_backward import InBackwardOptimizer


class Lomo(InBackwardOptimizer):
    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0,
                 clip_per_param_norm: float | None = None) -> None:
        def make_sub(group: dict) -> torch.optim.Optimizer:
            return torch.optim.SGD([group], lr=float(group["lr"]), weight_decay=group["weight_decay"])

        super().__init__(params, make_sub, clip_per_param_norm=clip_per_param_norm,
                         defaults={"lr": lr, "weight_decay": weight_decay})


class AdaLomo(InBackwardOptimizer):
    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8,
                 clip_per_param_norm: float | None = None) -> None:
        def make_sub(group: dict) -> torch.optim.Optimizer:
            return Adafactor([group], lr=float(group["lr"]), eps=eps, clip_threshold=clip_threshold,
                             decay_rate=decay_rate, weight_decay=group["weight_decay"], scale_parameter=True)

        super().__init__(params, make_sub, clip_per_param_norm=clip_per_param_norm,
                         defaults={"lr": lr, "weight_decay": weight_decay})
