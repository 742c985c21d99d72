"""lit_optim's own low-bit Adam, AdamW and Lion: block-wise companded 8-bit or 4-bit moments, one fused step.

On CUDA the step is one Triton launch per bucket of tensors (`lit_optim.kernels.triton_lowbit`): each parameter,
gradient and state byte is read once and written once, and nothing is compiled per shape, so the first step costs
what the others do. Elsewhere (CPU) the same math runs in plain torch (`lit_optim.kernels.reference`).

Every tensor is quantized the same way whatever its size (the last block padded), so a shard under FSDP keeps its
parameter's precision. State is plain tensors -- codes (int8/uint8) and fp32 scales per block, a CPU step count --
so checkpoints load with ``torch.load(weights_only=True)`` and resume exactly.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch

from lit_optim.kernels import codes
from lit_optim.kernels.reference import ADAM, ADAMW, LION, MOMENTS, step_tensor

DEFAULT_BLOCK = {8: 256, 4: 256}
KERNELS = ("auto", "triton", "torch")


def _local(t: torch.Tensor) -> torch.Tensor:
    # A DTensor (FSDP2 shard): its local part is what this rank steps and keeps state for.
    return t.to_local() if hasattr(t, "to_local") else t


def _triton_usable(device: torch.device) -> bool:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class _LowBitOptimizer(torch.optim.Optimizer):
    MODE: int = ADAMW

    def __init__(self, params: Iterable, lr: float | torch.Tensor, betas: tuple[float, float], eps: float,
                 weight_decay: float, *, bits: int = 8, block_size: int | None = None,
                 stochastic_rounding: bool = False, kernel: str = "auto") -> None:
        if bits not in DEFAULT_BLOCK:
            raise ValueError(f"bits={bits!r}: lit_optim's fused optimizers keep 8-bit or 4-bit moments (bits=8 or 4)")
        block_size = DEFAULT_BLOCK[bits] if block_size is None else block_size
        if not isinstance(block_size, int) or block_size < 32 or block_size > 4096 \
                or block_size & (block_size - 1):
            raise ValueError(f"block_size={block_size!r}: must be a power of two from 32 to 4096")
        if kernel not in KERNELS:
            raise ValueError(f"kernel={kernel!r}: choose one of {', '.join(KERNELS)}")
        lr_value = float(lr) if not isinstance(lr, torch.Tensor) else float(lr.detach().cpu())
        if not math.isfinite(lr_value) or lr_value < 0:
            raise ValueError(f"lr={lr_value!r}: must be a finite number >= 0")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas={betas!r}: two numbers in [0, 1)")
        if not (math.isfinite(eps) and eps >= 0.0):
            raise ValueError(f"eps={eps!r}: must be >= 0")
        if not (math.isfinite(weight_decay) and weight_decay >= 0.0):
            raise ValueError(f"weight_decay={weight_decay!r}: must be >= 0")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, bits=bits,
                        block_size=block_size, stochastic_rounding=bool(stochastic_rounding))
        self.kernel = kernel
        super().__init__(params, defaults)

    # --- state ----------------------------------------------------------------------------------------------------
    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        local = _local(p)
        if local.is_complex() or not local.is_floating_point():
            raise ValueError(f"{type(self).__name__} steps real floating-point parameters, got {local.dtype}")
        state = self.state[p]
        state["step"] = torch.tensor(0.0)
        state.update(codes.empty_state(local.numel(), group["bits"], group["block_size"], MOMENTS[self.MODE],
                                       local.device))
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts every floating state tensor to its parameter's dtype -- the fp32 scales to bf16, and the integer
        # codes too, through a temporary copy of each. So torch loads the groups and step counts only, and the codes
        # and scales are put in place here with their own dtypes, on the parameter's device.
        saved = state_dict["state"]
        steps_only = {pid: {k: v for k, v in st.items() if k == "step"} for pid, st in saved.items()}
        super().load_state_dict({**state_dict, "state": steps_only})
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        mine = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, mine):
            for key, value in saved.get(pid, {}).items():
                if key != "step" and isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(device=_local(p).device, copy=True)

    # --- step -----------------------------------------------------------------------------------------------------
    def _scalars(self, group: dict, step: int) -> dict:
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        out = dict(beta1=beta1, beta2=beta2, eps=group.get("eps", 0.0), weight_decay=group["weight_decay"])
        if self.MODE != LION:
            out["inv_bc1"] = 1.0 / (1.0 - beta1 ** step)
            out["inv_sqrt_bc2"] = 1.0 / math.sqrt(1.0 - beta2 ** step)
        out["lr"] = lr
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            buckets: dict[tuple, list] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p] or self._init_state(p, group)
                state["step"] += 1
                local, grad = _local(p), _local(p.grad)
                if local.numel() == 0:
                    continue
                buckets[(local.device, local.dtype, grad.dtype, int(state["step"]))].append((local, grad, state))
            for (device, _, _, step), items in buckets.items():
                self._step_bucket(group, gi, device, step, items)
        return loss

    def _step_bucket(self, group: dict, group_index: int, device: torch.device, step: int, items: list) -> None:
        scalars = self._scalars(group, step)
        lr = scalars["lr"]
        if isinstance(lr, torch.Tensor) and lr.device != device:
            scalars["lr"] = float(lr)
        sr = group["stochastic_rounding"]
        seed = (step * 1_000_003 + group_index * 7919) % (1 << 31)  # a function of the step: resumes reproduce it
        common = dict(mode=self.MODE, bits=group["bits"], block_size=group["block_size"], stochastic_rounding=sr,
                      **scalars)
        use_triton = self.kernel == "triton" or (self.kernel == "auto" and device.type == "cuda")
        if use_triton and not _triton_usable(device):
            if self.kernel == "triton":
                raise RuntimeError(f"kernel='triton' needs Triton and a CUDA device (parameters are on {device})")
            if device.type == "cuda" and not getattr(self, "_warned_no_triton", False):
                warnings.warn(f"{type(self).__name__}: Triton is not installed, so CUDA parameters step through the "
                              "plain-torch reference, many times slower than the fused kernel. Fix: pip install triton",
                              stacklevel=3)
                self._warned_no_triton = True
            use_triton = False
        fused = [(p, g, s) for p, g, s in items if p.is_contiguous()] if use_triton else []
        if fused:
            from lit_optim.kernels.triton_lowbit import step_many

            if isinstance(common["lr"], torch.Tensor) and common["lr"].dtype != torch.float32:
                common["lr"] = common["lr"].float()
            step_many([p for p, _, _ in fused], [g.contiguous() for _, g, _ in fused], [s for _, _, s in fused],
                      seed=seed, **common)
        rest = [it for it in items if not (use_triton and it[0].is_contiguous())]
        generator = None
        if sr and rest:
            generator = torch.Generator(device=device).manual_seed(seed)
        for p, g, s in rest:
            step_tensor(p, g, s, generator=generator, **common)


class LowBitAdamW(_LowBitOptimizer):
    """AdamW (decoupled weight decay) with `bits`-bit block-wise moments; see the module docstring."""

    MODE = ADAMW

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, bits: int = 8, block_size: int | None = None,
                 stochastic_rounding: bool = False, kernel: str = "auto") -> None:
        super().__init__(params, lr, betas, eps, weight_decay, bits=bits, block_size=block_size,
                         stochastic_rounding=stochastic_rounding, kernel=kernel)


class LowBitAdam(_LowBitOptimizer):
    """Adam (weight decay as an L2 term in the gradient) with `bits`-bit block-wise moments."""

    MODE = ADAM

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, bits: int = 8, block_size: int | None = None,
                 stochastic_rounding: bool = False, kernel: str = "auto") -> None:
        super().__init__(params, lr, betas, eps, weight_decay, bits=bits, block_size=block_size,
                         stochastic_rounding=stochastic_rounding, kernel=kernel)


class LowBitLion(_LowBitOptimizer):
    """Lion (sign of an interpolated momentum; decoupled weight decay) with a `bits`-bit block-wise momentum."""

    MODE = LION

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, bits: int = 8, block_size: int | None = None,
                 stochastic_rounding: bool = False, kernel: str = "auto") -> None:
        super().__init__(params, lr, betas, 0.0, weight_decay, bits=bits, block_size=block_size,
                         stochastic_rounding=stochastic_rounding, kernel=kernel)
