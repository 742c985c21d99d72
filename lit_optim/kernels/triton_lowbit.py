"""The low-bit Adam/AdamW/Lion step as one Triton launch over many tensors (CUDA; Triton's interpreter on CPU).

One program owns `ROWS` quantization blocks of one tensor: it reads the parameter, the gradient and the moments'
codes and scales once, updates in fp32, and writes the parameter, codes and scales once. Which tensor and which
blocks a program owns comes from a small chunk table; the tensors' addresses come from an address table, so a
launch covers every tensor of a (device, dtype, step) bucket with no per-tensor Python work beyond the table.

The arithmetic is `reference.step_tensor`'s, operation for operation: IEEE division and square root, and the kernel
is compiled without FMA contraction, so results match the reference bit for bit (stochastic rounding aside).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lit_optim.kernels import codes
from lit_optim.kernels.reference import LION

# Chosen on an H100/H200 with benchmarks/optimizer_step.py; see benchmarks/README.md.
ROWS = {8: 8, 4: 16}
NUM_WARPS = {8: 8, 4: 8}

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _decode_signed(q, scale, TOP: tl.constexpr):
    r = tl.div_rn(q.to(tl.float32), TOP)
    return (r * tl.abs(r)) * scale


@triton.jit
def _decode_unsigned(k, scale, LEVELS: tl.constexpr):
    r = tl.div_rn((k + 1).to(tl.float32), LEVELS)
    r2 = r * r
    return (r2 * r2) * scale


@triton.jit
def _encode_signed(x, safe_scale, TOP: tl.constexpr):
    t = tl.div_rn(tl.abs(x), safe_scale)
    q = tl.minimum(tl.floor(tl.sqrt_rn(t) * TOP + 0.5), TOP)
    return tl.where(x < 0, -q, q).to(tl.int32)


@triton.jit
def _encode_unsigned(x, safe_scale, LEVELS: tl.constexpr):
    t = tl.div_rn(x, safe_scale)
    k = tl.floor(tl.sqrt_rn(tl.sqrt_rn(t)) * LEVELS + 0.5) - 1.0
    return tl.minimum(tl.maximum(k, 0.0), LEVELS - 1.0).to(tl.int32)


@triton.jit
def _update(p, g, m, v, lr, beta1, beta2, eps, wd, inv_bc1, inv_sqrt_bc2, MODE: tl.constexpr):
    """(new parameter, new m, new v) in fp32; the same operations, in the same order, as reference.step_tensor."""
    if MODE == 2:  # Lion
        c = beta1 * m + (1.0 - beta1) * g
        direction = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))
        new_p = p * (1.0 - lr * wd) - lr * direction
        m = beta2 * m + (1.0 - beta2) * g
    else:
        if MODE == 0:  # Adam: L2 penalty in the gradient
            g = g + wd * p
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * (g * g)
        if MODE == 1:  # AdamW: decoupled decay
            p = p * (1.0 - lr * wd)
        denom = tl.sqrt_rn(v) * inv_sqrt_bc2 + eps
        new_p = p - (lr * inv_bc1) * tl.div_rn(m, denom)
    return new_p, m, v


@triton.jit
def _store_param(ptr, idx, ok, x, seed, P_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr):
    if STOCHASTIC:
        noise = (tl.randint(seed, idx.to(tl.int32)) & 0xFFFF).to(tl.int32)
        bits = (x.to(tl.int32, bitcast=True) + noise) & -65536
        x = bits.to(tl.float32, bitcast=True)
    tl.store(ptr + idx, x.to(P_DTYPE), mask=ok)


@triton.jit
def lowbit_step_kernel(
    chunk_tensor, chunk_block, numels, addresses, num_tensors,
    lr_ptr, lr, beta1, beta2, eps, wd, inv_bc1, inv_sqrt_bc2, seed,
    MODE: tl.constexpr, BITS: tl.constexpr, TOP: tl.constexpr, LEVELS: tl.constexpr, BLOCK: tl.constexpr,
    ROWS: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, LR_IN_MEMORY: tl.constexpr,
    STOCHASTIC: tl.constexpr,
):
    HALF: tl.constexpr = BLOCK // 2
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)
    first = tl.load(chunk_block + pid).to(tl.int64)
    n = tl.load(numels + t)
    n_blocks = (n + BLOCK - 1) // BLOCK
    # Address table rows: parameter, gradient, m codes, m scales, v codes, v scales.
    p_ptr = tl.load(addresses + t).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(addresses + num_tensors + t).to(tl.pointer_type(G_DTYPE))
    ms_ptr = tl.load(addresses + 3 * num_tensors + t).to(tl.pointer_type(tl.float32))
    if LR_IN_MEMORY:
        lr = tl.load(lr_ptr)

    rows = first + tl.arange(0, ROWS)
    row_ok = rows < n_blocks
    cols = tl.arange(0, HALF)
    lo = rows[:, None] * BLOCK + cols[None, :]
    hi = lo + HALF
    lo_ok = lo < n
    hi_ok = hi < n
    blk_ok = row_ok[:, None] & (cols[None, :] >= 0)

    p_lo = tl.load(p_ptr + lo, mask=lo_ok, other=0.0).to(tl.float32)
    p_hi = tl.load(p_ptr + hi, mask=hi_ok, other=0.0).to(tl.float32)
    g_lo = tl.load(g_ptr + lo, mask=lo_ok, other=0.0).to(tl.float32)
    g_hi = tl.load(g_ptr + hi, mask=hi_ok, other=0.0).to(tl.float32)
    m_scale = tl.load(ms_ptr + rows, mask=row_ok, other=0.0)[:, None]
    if BITS == 8:
        m_ptr = tl.load(addresses + 2 * num_tensors + t).to(tl.pointer_type(tl.int8))
        mq_lo = tl.load(m_ptr + lo, mask=blk_ok, other=0).to(tl.int32)
        mq_hi = tl.load(m_ptr + hi, mask=blk_ok, other=0).to(tl.int32)
    else:
        m_ptr = tl.load(addresses + 2 * num_tensors + t).to(tl.pointer_type(tl.uint8))
        byte_idx = rows[:, None] * HALF + cols[None, :]
        mb = tl.load(m_ptr + byte_idx, mask=blk_ok, other=0x88).to(tl.int32)
        mq_lo = (mb & 15) - 8
        mq_hi = (mb >> 4) - 8
    m_lo = _decode_signed(mq_lo, m_scale, TOP)
    m_hi = _decode_signed(mq_hi, m_scale, TOP)

    if MODE == 2:
        v_lo = m_lo
        v_hi = m_hi
    else:
        vs_ptr = tl.load(addresses + 5 * num_tensors + t).to(tl.pointer_type(tl.float32))
        v_ptr = tl.load(addresses + 4 * num_tensors + t).to(tl.pointer_type(tl.uint8))
        v_scale = tl.load(vs_ptr + rows, mask=row_ok, other=0.0)[:, None]
        if BITS == 8:
            vq_lo = tl.load(v_ptr + lo, mask=blk_ok, other=0).to(tl.int32)
            vq_hi = tl.load(v_ptr + hi, mask=blk_ok, other=0).to(tl.int32)
        else:
            vb = tl.load(v_ptr + byte_idx, mask=blk_ok, other=0).to(tl.int32)
            vq_lo = vb & 15
            vq_hi = vb >> 4
        v_lo = _decode_unsigned(vq_lo, v_scale, LEVELS)
        v_hi = _decode_unsigned(vq_hi, v_scale, LEVELS)

    np_lo, m_lo, v_lo = _update(p_lo, g_lo, m_lo, v_lo, lr, beta1, beta2, eps, wd, inv_bc1, inv_sqrt_bc2, MODE)
    np_hi, m_hi, v_hi = _update(p_hi, g_hi, m_hi, v_hi, lr, beta1, beta2, eps, wd, inv_bc1, inv_sqrt_bc2, MODE)
    _store_param(p_ptr, lo, lo_ok, np_lo, seed + t, P_DTYPE, STOCHASTIC)
    _store_param(p_ptr, hi, hi_ok, np_hi, seed + t, P_DTYPE, STOCHASTIC)

    m_lo = tl.where(lo_ok, m_lo, 0.0)
    m_hi = tl.where(hi_ok, m_hi, 0.0)
    m_new_scale = tl.maximum(tl.max(tl.abs(m_lo), axis=1), tl.max(tl.abs(m_hi), axis=1))
    m_safe = tl.where(m_new_scale > 0, m_new_scale, 1.0)[:, None]
    mq_lo = _encode_signed(m_lo, m_safe, TOP)
    mq_hi = _encode_signed(m_hi, m_safe, TOP)
    tl.store(ms_ptr + rows, m_new_scale, mask=row_ok)
    if BITS == 8:
        tl.store(m_ptr + lo, mq_lo.to(tl.int8), mask=blk_ok)
        tl.store(m_ptr + hi, mq_hi.to(tl.int8), mask=blk_ok)
    else:
        tl.store(m_ptr + byte_idx, ((mq_lo + 8) | ((mq_hi + 8) << 4)).to(tl.uint8), mask=blk_ok)

    if MODE != 2:
        v_lo = tl.where(lo_ok, v_lo, 0.0)
        v_hi = tl.where(hi_ok, v_hi, 0.0)
        v_new_scale = tl.maximum(tl.max(v_lo, axis=1), tl.max(v_hi, axis=1))
        v_safe = tl.where(v_new_scale > 0, v_new_scale, 1.0)[:, None]
        vq_lo = _encode_unsigned(v_lo, v_safe, LEVELS)
        vq_hi = _encode_unsigned(v_hi, v_safe, LEVELS)
        tl.store(vs_ptr + rows, v_new_scale, mask=row_ok)
        if BITS == 8:
            tl.store(v_ptr + lo, vq_lo.to(tl.uint8), mask=blk_ok)
            tl.store(v_ptr + hi, vq_hi.to(tl.uint8), mask=blk_ok)
        else:
            tl.store(v_ptr + byte_idx, (vq_lo | (vq_hi << 4)).to(tl.uint8), mask=blk_ok)


_CHUNK_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _chunk_table(numels: tuple[int, ...], block_size: int, rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Which tensor and which first block each program owns (cached: it depends only on the sizes)."""
    key = (numels, block_size, rows, str(device))
    table = _CHUNK_CACHE.get(key)
    if table is None:
        counts = torch.tensor([math.ceil(codes.num_blocks(n, block_size) / rows) for n in numels])
        tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts)
        starts = torch.cumsum(counts, 0) - counts
        first = (torch.arange(int(counts.sum())) - torch.repeat_interleave(starts, counts)) * rows
        table = (tensor.to(device), first.to(torch.int32).to(device))
        if len(_CHUNK_CACHE) > 64:
            _CHUNK_CACHE.clear()
        _CHUNK_CACHE[key] = table
    return table


def _to_device(values: list[int], device) -> torch.Tensor:
    host = torch.tensor(values, dtype=torch.int64)
    if torch.device(device).type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def step_many(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict], *, mode: int, bits: int,
              block_size: int, lr, beta1: float, beta2: float, eps: float, weight_decay: float,
              inv_bc1: float = 1.0, inv_sqrt_bc2: float = 1.0, stochastic_rounding: bool = False, seed: int = 0,
              rows: int | None = None, num_warps: int | None = None) -> None:
    """`reference.step_tensor` for every tensor of one bucket (same device, dtypes and step) in one launch."""
    if not params:
        return
    device = params[0].device
    rows = rows or ROWS[bits]
    num_warps = num_warps or NUM_WARPS[bits]
    numels = tuple(p.numel() for p in params)
    chunk_tensor, chunk_block = _chunk_table(numels, block_size, rows, device)
    lone = mode == LION
    addresses = [p.data_ptr() for p in params] + [g.data_ptr() for g in grads]
    for key in ("exp_avg", "exp_avg_scale") + (() if lone else ("exp_avg_sq", "exp_avg_sq_scale")):
        addresses += [s[key].data_ptr() for s in states]
    if lone:  # no second moment: point its rows at the first (never read)
        addresses += addresses[2 * len(params):4 * len(params)]
    addr = _to_device(addresses + list(numels), device)
    lr_in_memory = isinstance(lr, torch.Tensor)
    lr_ptr = lr if lr_in_memory else addr
    lowbit_step_kernel[(chunk_tensor.numel(),)](
        chunk_tensor, chunk_block, addr[6 * len(params):], addr, len(params),
        lr_ptr, 0.0 if lr_in_memory else float(lr), beta1, beta2, eps, weight_decay, inv_bc1, inv_sqrt_bc2, seed,
        MODE=mode, BITS=bits, TOP=float(codes.SIGNED_MAX[bits]), LEVELS=float(codes.UNSIGNED_LEVELS[bits]),
        BLOCK=block_size, ROWS=rows,
        P_DTYPE=_TL_DTYPES[params[0].dtype], G_DTYPE=_TL_DTYPES[grads[0].dtype],
        LR_IN_MEMORY=lr_in_memory, STOCHASTIC=bool(stochastic_rounding and params[0].dtype == torch.bfloat16),
        num_warps=num_warps, enable_fp_fusion=False,
    )
