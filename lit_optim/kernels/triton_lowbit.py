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
ROWS = {8: 4, 4: 8}  # quantization blocks per chunk
NUM_WARPS = {8: 4, 4: 4}
SPAN = 16  # chunks per program: the table lookups at a program's start are paid once per SPAN chunks

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _threshold(j, INV: tl.constexpr, POWER: tl.constexpr):
    a = (j - 0.5) * INV
    a2 = a * a
    if POWER == 4:
        a2 = a2 * a2
    return a2


@triton.jit
def _count(t, estimate, TOP: tl.constexpr, INV: tl.constexpr, POWER: tl.constexpr):
    # codes.encode's definition: thresholds at or below t, from an estimate off by at most one.
    j = tl.minimum(tl.maximum(estimate, 0.0), TOP)
    j = tl.where((j > 0) & (t < _threshold(j, INV, POWER)), j - 1.0, j)
    j = tl.where((j < TOP) & (t >= _threshold(j + 1.0, INV, POWER)), j + 1.0, j)
    return j


@triton.jit
def _encode_signed(x, inv_scale, TOP: tl.constexpr):
    t = tl.abs(x) * inv_scale
    q = _count(t, tl.floor(tl.sqrt(t) * TOP + 0.5), TOP, 1.0 / TOP, 2)
    return tl.where(x < 0, -q, q).to(tl.int32)


@triton.jit
def _encode_unsigned(x, inv_scale, LEVELS: tl.constexpr):
    t = x * inv_scale
    j = _count(t, tl.floor(tl.sqrt(tl.sqrt(t)) * LEVELS + 0.5), LEVELS, 1.0 / LEVELS, 4)
    return tl.maximum(j - 1.0, 0.0).to(tl.int32)


@triton.jit
def _decode_signed(q, scale, TOP: tl.constexpr):
    r = q.to(tl.float32) * (1.0 / TOP)
    return (r * tl.abs(r)) * scale


@triton.jit
def _decode_unsigned(k, scale, LEVELS: tl.constexpr):
    r = (k + 1).to(tl.float32) * (1.0 / LEVELS)
    r2 = r * r
    return (r2 * r2) * scale


@triton.jit
def _inverse(scale):
    return tl.where(scale > 0, tl.div_rn(1.0, tl.where(scale > 0, scale, 1.0)), 0.0)


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
def _store_param(ptr, idx, ok, x, seed, P_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr, MASKED: tl.constexpr):
    if STOCHASTIC:
        noise = (tl.randint(seed, idx) & 0xFFFF).to(tl.int32)
        bits = (x.to(tl.int32, bitcast=True) + noise) & -65536
        x = bits.to(tl.float32, bitcast=True)
    if MASKED:
        tl.store(ptr + idx, x.to(P_DTYPE), mask=ok)
    else:
        tl.store(ptr + idx, x.to(P_DTYPE))


@triton.jit
def _load(ptr, idx, ok, other, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr + idx, mask=ok, other=other)
    return tl.load(ptr + idx)


@triton.jit
def _store(ptr, idx, ok, x, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + idx, x, mask=ok)
    else:
        tl.store(ptr + idx, x)


@triton.jit
def _chunk(p_ptr, g_ptr, m_ptr, ms_ptr, v_ptr, vs_ptr, first_elem, remaining, n_rows,
           lr, beta1, beta2, eps, wd, inv_bc1, inv_sqrt_bc2, seed,
           MODE: tl.constexpr, BITS: tl.constexpr, TOP: tl.constexpr, LEVELS: tl.constexpr, BLOCK: tl.constexpr,
           ROWS: tl.constexpr, P_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr, MASKED: tl.constexpr):
    """ROWS blocks of one tensor, starting at its element `first_elem` (pointers already advanced to it); MASKED:
    the tensor ends inside this chunk (`remaining` elements and `n_rows` blocks are left)."""
    HALF: tl.constexpr = BLOCK // 2
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, HALF)
    lo = rows[:, None] * BLOCK + cols[None, :]  # int32 offsets within the chunk; the second half is lo + HALF
    hi = lo + HALF
    lo_ok = lo < remaining
    hi_ok = hi < remaining
    row_ok = rows < n_rows
    blk_ok = row_ok[:, None] & (cols[None, :] >= 0)
    byte_idx = rows[:, None] * HALF + cols[None, :]  # 4-bit: one byte holds an element of each half

    p_lo = _load(p_ptr, lo, lo_ok, 0.0, MASKED).to(tl.float32)
    p_hi = _load(p_ptr, hi, hi_ok, 0.0, MASKED).to(tl.float32)
    g_lo = _load(g_ptr, lo, lo_ok, 0.0, MASKED).to(tl.float32)
    g_hi = _load(g_ptr, hi, hi_ok, 0.0, MASKED).to(tl.float32)
    m_scale = _load(ms_ptr, rows, row_ok, 0.0, MASKED)[:, None]
    if BITS == 8:
        mq_lo = _load(m_ptr, lo, blk_ok, 0, MASKED).to(tl.int32)
        mq_hi = _load(m_ptr, hi, blk_ok, 0, MASKED).to(tl.int32)
    else:
        mb = _load(m_ptr, byte_idx, blk_ok, 0x88, MASKED).to(tl.int32)
        mq_lo = (mb & 15) - 8
        mq_hi = (mb >> 4) - 8
    m_lo = _decode_signed(mq_lo, m_scale, TOP)
    m_hi = _decode_signed(mq_hi, m_scale, TOP)
    if MODE == 2:
        v_lo = m_lo
        v_hi = m_hi
    else:
        v_scale = _load(vs_ptr, rows, row_ok, 0.0, MASKED)[:, None]
        if BITS == 8:
            vq_lo = _load(v_ptr, lo, blk_ok, 0, MASKED).to(tl.int32)
            vq_hi = _load(v_ptr, hi, blk_ok, 0, MASKED).to(tl.int32)
        else:
            vb = _load(v_ptr, byte_idx, blk_ok, 0, MASKED).to(tl.int32)
            vq_lo = vb & 15
            vq_hi = vb >> 4
        v_lo = _decode_unsigned(vq_lo, v_scale, LEVELS)
        v_hi = _decode_unsigned(vq_hi, v_scale, LEVELS)

    np_lo, m_lo, v_lo = _update(p_lo, g_lo, m_lo, v_lo, lr, beta1, beta2, eps, wd, inv_bc1, inv_sqrt_bc2, MODE)
    np_hi, m_hi, v_hi = _update(p_hi, g_hi, m_hi, v_hi, lr, beta1, beta2, eps, wd, inv_bc1, inv_sqrt_bc2, MODE)
    # Stochastic rounding: one random stream per chunk (the tensor's seed plus the chunk's first element).
    _store_param(p_ptr, lo, lo_ok, np_lo, seed + first_elem, P_DTYPE, STOCHASTIC, MASKED)
    _store_param(p_ptr, hi, hi_ok, np_hi, seed + first_elem, P_DTYPE, STOCHASTIC, MASKED)

    if MASKED:
        m_lo = tl.where(lo_ok, m_lo, 0.0)
        m_hi = tl.where(hi_ok, m_hi, 0.0)
    m_new = tl.maximum(tl.max(tl.abs(m_lo), axis=1), tl.max(tl.abs(m_hi), axis=1))
    m_inv = _inverse(m_new)[:, None]
    mq_lo = _encode_signed(m_lo, m_inv, TOP)
    mq_hi = _encode_signed(m_hi, m_inv, TOP)
    _store(ms_ptr, rows, row_ok, m_new, MASKED)
    if BITS == 8:
        _store(m_ptr, lo, blk_ok, mq_lo.to(tl.int8), MASKED)
        _store(m_ptr, hi, blk_ok, mq_hi.to(tl.int8), MASKED)
    else:
        _store(m_ptr, byte_idx, blk_ok, ((mq_lo + 8) | ((mq_hi + 8) << 4)).to(tl.uint8), MASKED)

    if MODE != 2:
        if MASKED:
            v_lo = tl.where(lo_ok, v_lo, 0.0)
            v_hi = tl.where(hi_ok, v_hi, 0.0)
        v_new = tl.maximum(tl.max(v_lo, axis=1), tl.max(v_hi, axis=1))
        v_inv = _inverse(v_new)[:, None]
        vq_lo = _encode_unsigned(v_lo, v_inv, LEVELS)
        vq_hi = _encode_unsigned(v_hi, v_inv, LEVELS)
        _store(vs_ptr, rows, row_ok, v_new, MASKED)
        if BITS == 8:
            _store(v_ptr, lo, blk_ok, vq_lo.to(tl.uint8), MASKED)
            _store(v_ptr, hi, blk_ok, vq_hi.to(tl.uint8), MASKED)
        else:
            _store(v_ptr, byte_idx, blk_ok, (vq_lo | (vq_hi << 4)).to(tl.uint8), MASKED)


@triton.jit
def lowbit_step_kernel(
    chunk_tensor, chunk_block, numels, addresses, num_tensors,
    lr_ptr, lr, beta1, beta2, eps, wd, inv_bc1, inv_sqrt_bc2, seed,
    MODE: tl.constexpr, BITS: tl.constexpr, TOP: tl.constexpr, LEVELS: tl.constexpr, BLOCK: tl.constexpr,
    ROWS: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, LR_IN_MEMORY: tl.constexpr,
    STOCHASTIC: tl.constexpr, ALIGNED: tl.constexpr, SPAN: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)
    first_block = tl.load(chunk_block + pid).to(tl.int64)
    n = tl.load(numels + t)
    first = first_block * BLOCK
    remaining = n - first
    code_first = first * BITS // 8
    # Address table rows: parameter, gradient, m codes, m scales, v codes, v scales -- advanced to this chunk.
    p_ptr = tl.load(addresses + t).to(tl.pointer_type(P_DTYPE)) + first
    g_ptr = tl.load(addresses + num_tensors + t).to(tl.pointer_type(G_DTYPE)) + first
    if BITS == 8:
        m_ptr = tl.load(addresses + 2 * num_tensors + t).to(tl.pointer_type(tl.int8)) + code_first
    else:
        m_ptr = tl.load(addresses + 2 * num_tensors + t).to(tl.pointer_type(tl.uint8)) + code_first
    ms_ptr = tl.load(addresses + 3 * num_tensors + t).to(tl.pointer_type(tl.float32)) + first_block
    v_ptr = tl.load(addresses + 4 * num_tensors + t).to(tl.pointer_type(tl.uint8)) + code_first
    vs_ptr = tl.load(addresses + 5 * num_tensors + t).to(tl.pointer_type(tl.float32)) + first_block
    if ALIGNED:  # every address 16-byte aligned (checked on the host): vector loads and stores
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
    if LR_IN_MEMORY:
        lr = tl.load(lr_ptr)
    seed = seed + t * 1_000_003
    # This program's span: up to SPAN chunks of ROWS blocks; whole chunks run unmasked (vector accesses), and a
    # tensor's last, partial chunk runs masked.
    CHUNK: tl.constexpr = ROWS * BLOCK
    full = tl.minimum(remaining // CHUNK, SPAN)
    for i in range(0, full):
        off = i * CHUNK
        pp = p_ptr + off
        gp = g_ptr + off
        mp = m_ptr + off * BITS // 8
        vp = v_ptr + off * BITS // 8
        if ALIGNED:  # the loop hides the alignment from the compiler: restate it
            pp = tl.multiple_of(pp, 16)
            gp = tl.multiple_of(gp, 16)
            mp = tl.multiple_of(mp, 16)
            vp = tl.multiple_of(vp, 16)
        _chunk(pp, gp, mp, ms_ptr + i * ROWS, vp, vs_ptr + i * ROWS, first + off, CHUNK, ROWS,
               lr, beta1, beta2, eps, wd, inv_bc1, inv_sqrt_bc2, seed,
               MODE, BITS, TOP, LEVELS, BLOCK, ROWS, P_DTYPE, STOCHASTIC, False)
    rest = remaining - full * CHUNK
    if (full < SPAN) & (rest > 0):
        off = full * CHUNK
        _chunk(p_ptr + off, g_ptr + off, m_ptr + off * BITS // 8, ms_ptr + full * ROWS, v_ptr + off * BITS // 8,
               vs_ptr + full * ROWS, first + off, rest.to(tl.int32), ((rest + BLOCK - 1) // BLOCK).to(tl.int32),
               lr, beta1, beta2, eps, wd, inv_bc1, inv_sqrt_bc2, seed,
               MODE, BITS, TOP, LEVELS, BLOCK, ROWS, P_DTYPE, STOCHASTIC, True)


_CHUNK_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _chunk_table(numels: tuple[int, ...], block_size: int, rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Which tensor and which first block each program owns, for programs of `rows` blocks each (cached: it depends
    only on the sizes)."""
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
              rows: int | None = None, num_warps: int | None = None, span: int | None = None):
    """`reference.step_tensor` for every tensor of one bucket (same device, dtypes and step) in one launch."""
    if not params:
        return
    device = params[0].device
    rows = rows or ROWS[bits]
    num_warps = num_warps or NUM_WARPS[bits]
    span = span or SPAN
    numels = tuple(p.numel() for p in params)
    chunk_tensor, chunk_block = _chunk_table(numels, block_size, rows * span, device)
    lone = mode == LION
    addresses = [p.data_ptr() for p in params] + [g.data_ptr() for g in grads]
    for key in ("exp_avg", "exp_avg_scale") + (() if lone else ("exp_avg_sq", "exp_avg_sq_scale")):
        addresses += [s[key].data_ptr() for s in states]
    if lone:  # no second moment: point its rows at the first (never read)
        addresses += addresses[2 * len(params):4 * len(params)]
    addr = _to_device(addresses + list(numels), device)
    lr_in_memory = isinstance(lr, torch.Tensor)
    lr_ptr = lr if lr_in_memory else addr
    return lowbit_step_kernel[(chunk_tensor.numel(),)](
        chunk_tensor, chunk_block, addr[6 * len(params):], addr, len(params),
        lr_ptr, 0.0 if lr_in_memory else float(lr), beta1, beta2, eps, weight_decay, inv_bc1, inv_sqrt_bc2, seed,
        MODE=mode, BITS=bits, TOP=float(codes.SIGNED_MAX[bits]), LEVELS=float(codes.UNSIGNED_LEVELS[bits]),
        BLOCK=block_size, ROWS=rows,
        P_DTYPE=_TL_DTYPES[params[0].dtype], G_DTYPE=_TL_DTYPES[grads[0].dtype],
        LR_IN_MEMORY=lr_in_memory, STOCHASTIC=bool(stochastic_rounding and params[0].dtype == torch.bfloat16),
        ALIGNED=all(a % 16 == 0 for a in addresses), SPAN=span,
        num_warps=num_warps, enable_fp_fusion=False,
    )
