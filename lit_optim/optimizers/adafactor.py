"""Adafactor with an absolute learning rate (as Hugging Face runs it for ``galore_adafactor``), and AdaLomo's update.

Shazeer & Stern (2018): no first moment; for a matrix the second moment is factored into row and column averages of
G² + eps1 (decay 1 - t^decay_rate); the update G / sqrt(v) is clipped to RMS <= clip_threshold. Unlike PyTorch's
`torch.optim.Adafactor` (whose step is min(lr, 1/sqrt(t)) times the parameter's RMS), the step here is ``lr`` itself
(Hugging Face's ``relative_step=False, scale_parameter=False``), so it works on GaLore's low-rank stand-ins, whose value
is zero. ``scale_parameter=True`` multiplies the step by max(eps2, RMS(parameter)): AdaLomo's grouped update
normalisation (Lv et al., 2023).
"""

from __future__ import annotations

import torch


class Adafactor(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        weight_decay: float = 0.0,
        scale_parameter: bool = False,
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if decay_rate >= 0:
            raise ValueError(f"decay_rate must be negative (second-moment decay 1 - t^decay_rate), got {decay_rate}")
        defaults = {"lr": lr, "eps": tuple(eps), "clip_threshold": clip_threshold, "decay_rate": decay_rate,
                    "weight_decay": weight_decay, "scale_parameter": scale_parameter}
        super().__init__(params, defaults)

    @staticmethod
    def factored(shape: torch.Size | tuple[int, ...]) -> bool:
        return len(shape) == 2

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            eps1, eps2 = group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    if self.factored(p.shape):
                        state["exp_avg_sq_row"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
                        state["exp_avg_sq_col"] = torch.zeros(p.shape[1], dtype=torch.float32, device=p.device)
                    else:
                        state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                state["step"] += 1
                beta2 = 1.0 - state["step"] ** group["decay_rate"]
                sq = grad.square().add_(eps1)
                if self.factored(p.shape):
                    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
                    row.lerp_(sq.mean(dim=1), 1.0 - beta2)
                    col.lerp_(sq.mean(dim=0), 1.0 - beta2)
                    # v ≈ row colᵀ / mean(row): its inverse square root, as an outer product of two vectors.
                    r_inv = (row / row.mean()).rsqrt_().unsqueeze(1)
                    update = sq.copy_(grad).mul_(r_inv).mul_(col.rsqrt().unsqueeze(0))
                else:
                    v = state["exp_avg_sq"]
                    v.lerp_(sq, 1.0 - beta2)
                    update = sq.copy_(grad).mul_(v.rsqrt())
                rms = update.square().mean().sqrt()
                update.div_((rms / group["clip_threshold"]).clamp_(min=1.0))
                lr = float(group["lr"])
                if group["scale_parameter"]:
                    rms_p = float(torch.linalg.vector_norm(p, dtype=torch.float32)) / p.numel() ** 0.5
                    lr = lr * max(eps2, rms_p)
                if group["weight_decay"]:
                    p.mul_(1.0 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-lr)
        return loss
