"""The low-bit step in plain torch, one tensor at a time: the semantics of lit_optim's fused optimizers.

`step_tensor` is what the Triton kernel computes, operation for operation in fp32 (no fused multiply-adds), so on
the same inputs the two agree bit for bit; CPU training uses this path directly. Moments are decoded, updated,
used for the parameter's update at full precision, then encoded again (see `codes`).
"""

from __future__ import annotations

import torch

from lit_optim.kernels import codes

ADAM, ADAMW, LION = 0, 1, 2
MOMENTS = {ADAM: 2, ADAMW: 2, LION: 1}


def _fp32(value) -> torch.Tensor:
    # A 0-dim CPU tensor enters device arithmetic as a scalar, with no host-to-device copy per step; a tensor lr stays
    # where it is (on the device: no sync to read it).
    if isinstance(value, torch.Tensor):
        return value.detach().to(dtype=torch.float32).reshape(())
    return torch.tensor(value, dtype=torch.float32)


def round_to_bf16_stochastic(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability equal to the dropped fraction (unbiased in expectation)."""
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits = (x.view(torch.int32) + noise) & -65536
    return bits.view(torch.float32).to(torch.bfloat16)


def _store(state: dict, key: str, new_codes: torch.Tensor, scale: torch.Tensor) -> None:
    # In place: the state tensors keep their identity (and storage) across steps, as the kernel's do.
    state[key].copy_(new_codes)
    state[key + "_scale"].copy_(scale)


# On the CPU a tensor is stepped in runs of this many blocks: the ~20 fp32 temporaries of one run stay in cache
# instead of streaming through memory once each. Blocks are independent (each has its own scale), so the result is
# the same bit for bit whatever the run length.
CPU_RUN_ELEMENTS = 1 << 18


def _state_rows(state: dict, start: int, stop: int, block_bytes: int) -> dict:
    """Views of blocks [start, stop) of the codes (`block_bytes` per block) and scales (one per block) in `state`."""
    out = {}
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            out[key] = state[key][start * block_bytes:stop * block_bytes]
            out[key + "_scale"] = state[key + "_scale"][start:stop]
    return out


@torch.no_grad()
def step_tensor(p: torch.Tensor, grad: torch.Tensor, state: dict, *, mode: int, bits: int, block_size: int,
                lr, beta1: float, beta2: float, eps: float, weight_decay: float, inv_bc1: float = 1.0,
                inv_sqrt_bc2: float = 1.0, stochastic_rounding: bool = False,
                generator: torch.Generator | None = None) -> None:
    """One step of `mode` (ADAM, ADAMW or LION) for parameter `p` in place; `state` holds its codes and scales.

    ``inv_bc1 = 1 / (1 - beta1**t)`` and ``inv_sqrt_bc2 = 1 / sqrt(1 - beta2**t)`` (Adam's bias corrections).
    """
    hp = dict(mode=mode, bits=bits, block_size=block_size, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
              weight_decay=weight_decay, inv_bc1=inv_bc1, inv_sqrt_bc2=inv_sqrt_bc2)
    n = p.numel()
    blocks = codes.num_blocks(n, block_size)
    run = max(1, CPU_RUN_ELEMENTS // block_size)
    sr = stochastic_rounding and p.dtype == torch.bfloat16
    if p.device.type != "cpu" or blocks <= run or sr or not (p.is_contiguous() and grad.is_contiguous()):
        # One pass over the whole tensor (the CUDA fallback, small tensors, and stochastic rounding, whose noise is
        # drawn for the whole tensor at once so that its stream does not depend on the run length).
        _step_blocks(p, grad, state, stochastic_rounding=sr, generator=generator, **hp)
        return
    flat_p, flat_g = p.view(-1), grad.view(-1)
    for start in range(0, blocks, run):
        stop = min(blocks, start + run)
        lo, hi = start * block_size, min(n, stop * block_size)
        _step_blocks(flat_p[lo:hi], flat_g[lo:hi], _state_rows(state, start, stop, block_size * bits // 8), **hp)


def _step_blocks(p: torch.Tensor, grad: torch.Tensor, state: dict, *, mode: int, bits: int, block_size: int,
                 lr, beta1: float, beta2: float, eps: float, weight_decay: float, inv_bc1: float,
                 inv_sqrt_bc2: float, stochastic_rounding: bool = False,
                 generator: torch.Generator | None = None) -> None:
    dev, n = p.device, p.numel()
    blocks = codes.num_blocks(n, block_size)
    shape = (blocks, block_size)
    pad = blocks * block_size - n

    def padded(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t.reshape(-1).float(), (0, pad)).view(shape)

    f = _fp32  # every scalar in fp32, as the kernel has it
    one, lr32, b1, b2, wd = f(1.0), f(lr), f(beta1), f(beta2), f(weight_decay)
    p32, g = padded(p), padded(grad)
    valid = (torch.arange(blocks * block_size, device=dev) < n).view(shape)
    m = codes.decode(state["exp_avg"], state["exp_avg_scale"], bits, block_size, signed=True)

    if mode == LION:
        c = b1 * m + (one - b1) * g
        direction = torch.sign(c)
        new_p = p32 * (one - lr32 * wd) - lr32 * direction
        m = b2 * m + (one - b2) * g
    else:
        v = codes.decode(state["exp_avg_sq"], state["exp_avg_sq_scale"], bits, block_size, signed=False)
        if mode == ADAM:
            g = g + wd * p32
        m = b1 * m + (one - b1) * g
        v = b2 * v + (one - b2) * (g * g)
        if mode == ADAMW:
            p32 = p32 * (one - lr32 * wd)
        denom = torch.sqrt(v) * f(inv_sqrt_bc2) + f(eps)
        new_p = p32 - (lr32 * f(inv_bc1)) * (m / denom)
        v = torch.where(valid, v, 0.0)
        _store(state, "exp_avg_sq", *codes.encode(v, bits, signed=False))

    m = torch.where(valid, m, 0.0)
    _store(state, "exp_avg", *codes.encode(m, bits, signed=True))
    flat = new_p.reshape(-1)[:n]
    if stochastic_rounding and p.dtype == torch.bfloat16:
        p.copy_(round_to_bf16_stochastic(flat.contiguous(), generator).view_as(p))
    else:
        p.copy_(flat.view_as(p))
