"""The low-bit Adam/AdamW/Lion step as one Triton launch over many tensors (CUDA; Triton's interpreter on CPU).

A program (one warp) steps a span of quantization blocks of one tensor, block by block: it reads the parameter, the
gradient and the moments' codes and scales once, updates in fp32, and writes the parameter, codes and scales once.
A block's scale is a scalar of the loop and its reductions stay within the warp. Which tensor and which blocks a
program owns comes from a small chunk table; the tensors' addresses come from an address table, so a launch covers
every tensor of a (device, dtype, step) bucket with no per-tensor Python work beyond the table.

The arithmetic is `reference.step_tensor`'s, operation for operation. With ``exact=True`` (IEEE division and square
root, no FMA contraction) the results match the reference bit for bit, stochastic rounding aside; the default trades
that for the hardware's approximate square root and division, which halves the instructions per element.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from lit_optim.kernels import codes
from lit_optim.kernels.reference import LION

# Chosen on an H100 with benchmarks/lowbit_kernel.py (see benchmarks/README.md): one warp per program for blocks of up
# to 256 per tile, so a block's reductions stay within the warp (shuffles, no barrier); more warps for larger blocks,
# which would otherwise hold too many elements per thread.
SPAN = 64  # blocks per program: the table lookups at a program's start are paid once per SPAN blocks


def _num_warps(bits: int, block_size: int) -> int:
    tile = block_size if bits == 8 else block_size // 2
    return max(1, min(8, tile // 256))

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _sqrt(x, EXACT: tl.constexpr, ASM: tl.constexpr):
    """EXACT: IEEE; else the multifunction unit's approximate root (one instruction with ASM, flushing denormals)."""
    if EXACT:
        return tl.sqrt_rn(x)
    elif ASM:
        return tl.inline_asm_elementwise("sqrt.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return tl.sqrt(x)


@triton.jit
def _divide(a, b, EXACT: tl.constexpr, ASM: tl.constexpr):
    if EXACT:
        return tl.div_rn(a, b)
    elif ASM:
        return tl.inline_asm_elementwise("div.approx.ftz.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.fdiv(a, b, ieee_rounding=False)


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
def _encode_signed(x, inv_scale, TOP: tl.constexpr, EXACT: tl.constexpr, ASM: tl.constexpr):
    t = tl.abs(x) * inv_scale
    q = tl.floor(_sqrt(t, False, ASM) * TOP + 0.5)
    if EXACT:
        q = _count(t, q, TOP, 1.0 / TOP, 2)
    else:  # the estimate alone: a value within an ulp of a midpoint may take the neighbouring code
        q = tl.minimum(q, TOP)
    return tl.where(x < 0, -q, q).to(tl.int32)


@triton.jit
def _encode_unsigned(x, root_x, inv_scale, root_inv_scale, LEVELS: tl.constexpr, EXACT: tl.constexpr,
                     ASM: tl.constexpr):
    """root_x: sqrt(x) from the update, so the fourth root of x / scale takes one more square root, not two."""
    t = x * inv_scale
    j = tl.floor(_sqrt(root_x * root_inv_scale, False, ASM) * LEVELS + 0.5)
    if EXACT:
        j = _count(t, j, LEVELS, 1.0 / LEVELS, 4)
    else:
        j = tl.minimum(j, LEVELS)
    return tl.maximum(j - 1.0, 0.0).to(tl.int32)


@triton.jit
def _decode_signed(q, scale, TOP: tl.constexpr, EXACT: tl.constexpr):
    if EXACT:
        r = q.to(tl.float32) * (1.0 / TOP)
        return (r * tl.abs(r)) * scale
    # q * |q| is an exact integer: one conversion and one multiply by the block's scale / TOP**2
    return (q * tl.abs(q)).to(tl.float32) * (scale * (1.0 / (TOP * TOP)))


@triton.jit
def _decode_unsigned(k, scale, LEVELS: tl.constexpr, EXACT: tl.constexpr):
    if EXACT:
        r = (k + 1).to(tl.float32) * (1.0 / LEVELS)
        r2 = r * r
        return (r2 * r2) * scale
    k2 = ((k + 1) * (k + 1)).to(tl.float32)  # (k + 1)**2 <= 65536: exact
    return (k2 * k2) * (scale * (1.0 / (LEVELS * LEVELS * LEVELS * LEVELS)))


@triton.jit
def _inverse(scale):
    return tl.where(scale > 0, tl.div_rn(1.0, tl.where(scale > 0, scale, 1.0)), 0.0)


@triton.jit
def _update(p, g, m, v, lr, beta1, beta2, eps, wd, inv_bc1, inv_sqrt_bc2, MODE: tl.constexpr, EXACT: tl.constexpr,
            ASM: tl.constexpr):
    """(new parameter, new m, new v, sqrt(new v)) in fp32: the operations of reference.step_tensor, in its order;
    EXACT: with IEEE square root and division (bit for bit), else the hardware's approximate ones (a few ulp)."""
    root_v = v
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
        root_v = _sqrt(v, EXACT, ASM)
        new_p = p - (lr * inv_bc1) * _divide(m, root_v * inv_sqrt_bc2 + eps, EXACT, ASM)
    return new_p, m, v, root_v


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
def _advance(p, g, mq, vq, m_scale, v_scale, p_ptr, idx, ok, seed, lr, beta1, beta2, eps, wd, inv_bc1, inv_sqrt_bc2,
             MODE: tl.constexpr, TOP: tl.constexpr, LEVELS: tl.constexpr, P_DTYPE: tl.constexpr,
             STOCHASTIC: tl.constexpr, MASKED: tl.constexpr, EXACT: tl.constexpr, ASM: tl.constexpr):
    """One tile of a block: decode its moments, step, store the parameter; (m, v, sqrt(v)) with padding zeroed."""
    m = _decode_signed(mq, m_scale, TOP, EXACT)
    v = m
    if MODE != 2:
        v = _decode_unsigned(vq, v_scale, LEVELS, EXACT)
    new_p, m, v, root_v = _update(p, g, m, v, lr, beta1, beta2, eps, wd, inv_bc1, inv_sqrt_bc2, MODE, EXACT, ASM)
    _store_param(p_ptr, idx, ok, new_p, seed, P_DTYPE, STOCHASTIC, MASKED)
    if MASKED:
        m = tl.where(ok, m, 0.0)
        v = tl.where(ok, v, 0.0)
    return m, v, root_v


@triton.jit
def _block(p_ptr, g_ptr, m_ptr, ms_ptr, v_ptr, vs_ptr, first_elem, remaining,
           lr, beta1, beta2, eps, wd, inv_bc1, inv_sqrt_bc2, seed,
           MODE: tl.constexpr, BITS: tl.constexpr, TOP: tl.constexpr, LEVELS: tl.constexpr, BLOCK: tl.constexpr,
           P_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr, MASKED: tl.constexpr, EXACT: tl.constexpr,
           ASM: tl.constexpr):
    """One quantization block of one tensor (pointers advanced to it; its scales are the scalars at ms_ptr and
    vs_ptr). 8-bit: one tile of BLOCK elements. 4-bit: two tiles, the block's halves, whose codes share bytes.
    MASKED: the tensor ends inside this block, `remaining` elements in."""
    PART: tl.constexpr = BLOCK if BITS == 8 else BLOCK // 2
    lo = tl.arange(0, PART)
    hi = lo + PART
    lo_ok = lo < remaining
    hi_ok = hi < remaining

    m_scale = tl.load(ms_ptr)
    p_lo = _load(p_ptr, lo, lo_ok, 0.0, MASKED).to(tl.float32)
    g_lo = _load(g_ptr, lo, lo_ok, 0.0, MASKED).to(tl.float32)
    if BITS == 8:
        mq_lo = tl.load(m_ptr + lo).to(tl.int32)
    else:
        p_hi = _load(p_ptr, hi, hi_ok, 0.0, MASKED).to(tl.float32)
        g_hi = _load(g_ptr, hi, hi_ok, 0.0, MASKED).to(tl.float32)
        mb = tl.load(m_ptr + lo).to(tl.int32)
        mq_lo = (mb & 15) - 8
        mq_hi = (mb >> 4) - 8
    v_scale = m_scale  # Lion keeps no second moment: these stand in, unread
    vq_lo = mq_lo
    vq_hi = mq_lo
    if MODE != 2:
        v_scale = tl.load(vs_ptr)
        vb = tl.load(v_ptr + lo).to(tl.int32)
        if BITS == 8:
            vq_lo = vb
        else:
            vq_lo = vb & 15
            vq_hi = vb >> 4

    # Stochastic rounding: one random stream per block (the tensor's seed plus the block's first element).
    m_lo, v_lo, r_lo = _advance(p_lo, g_lo, mq_lo, vq_lo, m_scale, v_scale, p_ptr, lo, lo_ok, seed + first_elem,
                                lr, beta1, beta2, eps, wd, inv_bc1, inv_sqrt_bc2,
                                MODE, TOP, LEVELS, P_DTYPE, STOCHASTIC, MASKED, EXACT, ASM)
    m_new = tl.max(tl.abs(m_lo), axis=0)
    v_new = tl.max(v_lo, axis=0)
    if BITS == 4:
        m_hi, v_hi, r_hi = _advance(p_hi, g_hi, mq_hi, vq_hi, m_scale, v_scale, p_ptr, hi, hi_ok, seed + first_elem,
                                    lr, beta1, beta2, eps, wd, inv_bc1, inv_sqrt_bc2,
                                    MODE, TOP, LEVELS, P_DTYPE, STOCHASTIC, MASKED, EXACT, ASM)
        m_new = tl.maximum(m_new, tl.max(tl.abs(m_hi), axis=0))
        v_new = tl.maximum(v_new, tl.max(v_hi, axis=0))

    m_inv = _inverse(m_new)
    tl.store(ms_ptr, m_new)
    mq_lo = _encode_signed(m_lo, m_inv, TOP, EXACT, ASM)
    if BITS == 8:
        tl.store(m_ptr + lo, mq_lo.to(tl.int8))
    else:
        mq_hi = _encode_signed(m_hi, m_inv, TOP, EXACT, ASM)
        tl.store(m_ptr + lo, ((mq_lo + 8) | ((mq_hi + 8) << 4)).to(tl.uint8))
    if MODE != 2:
        v_inv = _inverse(v_new)
        v_root_inv = tl.sqrt_rn(v_inv)
        tl.store(vs_ptr, v_new)
        vq_lo = _encode_unsigned(v_lo, r_lo, v_inv, v_root_inv, LEVELS, EXACT, ASM)
        if BITS == 8:
            tl.store(v_ptr + lo, vq_lo.to(tl.uint8))
        else:
            vq_hi = _encode_unsigned(v_hi, r_hi, v_inv, v_root_inv, LEVELS, EXACT, ASM)
            tl.store(v_ptr + lo, (vq_lo | (vq_hi << 4)).to(tl.uint8))


@triton.jit
def lowbit_step_kernel(
    chunk_tensor, chunk_block, numels, addresses, num_tensors,
    lr_ptr, lr, beta1, beta2, eps, wd, inv_bc1, inv_sqrt_bc2, seed,
    MODE: tl.constexpr, BITS: tl.constexpr, TOP: tl.constexpr, LEVELS: tl.constexpr, BLOCK: tl.constexpr,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, LR_IN_MEMORY: tl.constexpr,
    STOCHASTIC: tl.constexpr, ALIGNED: tl.constexpr, SPAN: tl.constexpr, EXACT: tl.constexpr, ASM: tl.constexpr,
):
    """Program `pid` steps up to SPAN consecutive quantization blocks of one tensor (the chunk table says which)."""
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)
    first_block = tl.load(chunk_block + pid).to(tl.int64)
    n = tl.load(numels + t)
    first = first_block * BLOCK
    remaining = n - first
    CODE_BYTES: tl.constexpr = BLOCK * BITS // 8
    # Address table rows: parameter, gradient, m codes, m scales, v codes, v scales -- advanced to this span.
    p_ptr = tl.load(addresses + t).to(tl.pointer_type(P_DTYPE)) + first
    g_ptr = tl.load(addresses + num_tensors + t).to(tl.pointer_type(G_DTYPE)) + first
    if BITS == 8:
        m_ptr = tl.load(addresses + 2 * num_tensors + t).to(tl.pointer_type(tl.int8)) + first_block * CODE_BYTES
    else:
        m_ptr = tl.load(addresses + 2 * num_tensors + t).to(tl.pointer_type(tl.uint8)) + first_block * CODE_BYTES
    ms_ptr = tl.load(addresses + 3 * num_tensors + t).to(tl.pointer_type(tl.float32)) + first_block
    v_ptr = tl.load(addresses + 4 * num_tensors + t).to(tl.pointer_type(tl.uint8)) + first_block * CODE_BYTES
    vs_ptr = tl.load(addresses + 5 * num_tensors + t).to(tl.pointer_type(tl.float32)) + first_block
    if LR_IN_MEMORY:
        lr = tl.load(lr_ptr)
    seed = seed + t * 1_000_003
    full = tl.minimum(remaining // BLOCK, SPAN)
    for i in range(0, full):
        pp = p_ptr + i * BLOCK
        gp = g_ptr + i * BLOCK
        mp = m_ptr + i * CODE_BYTES
        vp = v_ptr + i * CODE_BYTES
        if ALIGNED:  # every address 16-byte aligned (checked on the host): vector loads and stores
            pp = tl.multiple_of(pp, 16)
            gp = tl.multiple_of(gp, 16)
            mp = tl.multiple_of(mp, 16)
            vp = tl.multiple_of(vp, 16)
        _block(pp, gp, mp, ms_ptr + i, vp, vs_ptr + i, first + i * BLOCK, BLOCK,
               lr, beta1, beta2, eps, wd, inv_bc1, inv_sqrt_bc2, seed,
               MODE, BITS, TOP, LEVELS, BLOCK, P_DTYPE, STOCHASTIC, False, EXACT, ASM)
    rest = remaining - full * BLOCK
    if (full < SPAN) & (rest > 0):  # the tensor's last, partial block
        _block(p_ptr + full * BLOCK, g_ptr + full * BLOCK, m_ptr + full * CODE_BYTES, ms_ptr + full,
               v_ptr + full * CODE_BYTES, vs_ptr + full, first + full * BLOCK, rest.to(tl.int32),
               lr, beta1, beta2, eps, wd, inv_bc1, inv_sqrt_bc2, seed,
               MODE, BITS, TOP, LEVELS, BLOCK, P_DTYPE, STOCHASTIC, True, EXACT, ASM)


_CHUNK_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _chunk_table(numels: tuple[int, ...], block_size: int, span: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Which tensor and which first block each program owns, for programs of `span` blocks each (cached: it depends
    only on the sizes)."""
    key = (numels, block_size, span, str(device))
    table = _CHUNK_CACHE.get(key)
    if table is None:
        counts = torch.tensor([math.ceil(codes.num_blocks(n, block_size) / span) for n in numels])
        tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts)
        starts = torch.cumsum(counts, 0) - counts
        first = (torch.arange(int(counts.sum())) - torch.repeat_interleave(starts, counts)) * span
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
              exact: bool = False, num_warps: int | None = None, span: int | None = None):
    """`reference.step_tensor` for every tensor of one bucket (same device, dtypes and step) in one launch.

    exact=True reproduces the reference bit for bit (IEEE square roots and divisions, codes settled by exact
    comparisons, no fused multiply-adds). The default uses the hardware's approximate square root and division and
    fused multiply-adds: parameters within a few ulp of the reference's, and a code one level off where a moment
    falls within an ulp of the midpoint between two levels. That halves the arithmetic per element, which is what
    bounds this kernel's speed (see benchmarks/README.md)."""
    if not params:
        return
    device = params[0].device
    num_warps = num_warps or _num_warps(bits, block_size)
    span = span or SPAN
    numels = tuple(p.numel() for p in params)
    chunk_tensor, chunk_block = _chunk_table(numels, block_size, span, device)
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
        BLOCK=block_size,
        P_DTYPE=_TL_DTYPES[params[0].dtype], G_DTYPE=_TL_DTYPES[grads[0].dtype],
        LR_IN_MEMORY=lr_in_memory, STOCHASTIC=bool(stochastic_rounding and params[0].dtype == torch.bfloat16),
        ALIGNED=all(a % 16 == 0 for a in addresses), SPAN=span, EXACT=exact,
        ASM=os.environ.get("TRITON_INTERPRET") != "1",  # the interpreter runs no PTX
        num_warps=num_warps, enable_fp_fusion=not exact,
    )
