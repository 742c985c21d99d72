"""Block-wise companded codes for optimizer moments, in plain torch.

Each tensor's moments are cut into blocks of `block_size` elements (the last block padded), whatever the tensor's
size, so a parameter's precision never depends on its shape or on how it is sharded. A block keeps one fp32 scale
and one code per element:

- **signed (first moment)**: scale = the block's largest magnitude; code q in [-Q, Q] with Q = 127 (8-bit) or 7
  (4-bit), value = scale * (q / Q) * |q / Q|. The square spends the codes where Adam's momentum mostly lives, near
  zero; a linear code would round everything under scale / (2Q) to zero.
- **unsigned (second moment)**: scale = the block's largest value; code k in [0, N) with N = 256 or 16, value =
  scale * ((k + 1) / N) ** 4. The fourth power (a square in sqrt(v), which is what the update divides by) covers a
  range of N**4 (4e9 at 8 bits); there is no zero, so a small second moment is rounded up, never to zero, and the
  update it divides can only shrink.

Encoding rounds to the nearest code in the companded domain (sqrt of the magnitude, fourth root of the variance),
defined by exact fp32 comparisons with the midpoints between levels; decoding is fp32 multiplications. Both are
exact functions of their fp32 inputs, so the Triton kernel (built without FMA contraction) reproduces them bit for
bit.

4-bit codes are packed two per byte, the first half of a block in the low nibbles and the second half in the high
nibbles (byte j of a block holds elements j and j + block_size / 2), so a kernel loads both halves with unit stride.
"""

from __future__ import annotations

import math

import torch

SIGNED_MAX = {8: 127, 4: 7}
UNSIGNED_LEVELS = {8: 256, 4: 16}
NIBBLE_OFFSET = 8  # 4-bit signed codes -7..7 are stored as 1..15


def num_blocks(numel: int, block_size: int) -> int:
    return max(1, math.ceil(numel / block_size))


def code_bytes(numel: int, bits: int, block_size: int) -> int:
    """Bytes of codes for one moment of a tensor with `numel` elements (padded to whole blocks)."""
    return num_blocks(numel, block_size) * block_size * bits // 8


def state_bytes(numel: int, bits: int, block_size: int, moments: int) -> int:
    """Bytes of optimizer state for one tensor: codes plus one fp32 scale per block, per moment."""
    return moments * (code_bytes(numel, bits, block_size) + 4 * num_blocks(numel, block_size))


def empty_moment(numel: int, bits: int, block_size: int, signed: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales of an all-zero moment (scale 0 decodes every code to 0)."""
    blocks = num_blocks(numel, block_size)
    size = blocks * block_size * bits // 8
    if bits == 8:
        codes = torch.zeros(size, dtype=torch.int8 if signed else torch.uint8, device=device)
    else:
        fill = (NIBBLE_OFFSET | NIBBLE_OFFSET << 4) if signed else 0
        codes = torch.full((size,), fill, dtype=torch.uint8, device=device)
    return codes, torch.zeros(blocks, dtype=torch.float32, device=device)


def empty_state(numel: int, bits: int, block_size: int, moments: int, device) -> dict[str, torch.Tensor]:
    """A tensor's all-zero optimizer state: `exp_avg` (signed) and, for two moments, `exp_avg_sq` (unsigned), each
    with its `_scale`."""
    state = {}
    state["exp_avg"], state["exp_avg_scale"] = empty_moment(numel, bits, block_size, True, device)
    if moments == 2:
        state["exp_avg_sq"], state["exp_avg_sq_scale"] = empty_moment(numel, bits, block_size, False, device)
    return state


STATE_KEYS = frozenset({"exp_avg", "exp_avg_scale", "exp_avg_sq", "exp_avg_sq_scale"})


def prefix(state: dict[str, torch.Tensor], numel: int, bits: int, block_size: int) -> dict[str, torch.Tensor]:
    """`state` for a tensor of `numel` elements whose buffers may be sized for more (an FSDP2 shard shorter than the
    largest): views of the first blocks, written in place. `state` itself where the sizes already match."""
    blocks = num_blocks(numel, block_size)
    if state["exp_avg_scale"].numel() == blocks:
        return state
    nbytes = blocks * block_size * bits // 8
    return {k: (v[:blocks] if k.endswith("_scale") else v[:nbytes]) if k in STATE_KEYS else v
            for k, v in state.items()}


def _unpack(codes: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """Codes as int32, shape (blocks, block_size)."""
    if bits == 8:
        return codes.view(-1, block_size).to(torch.int32)
    byte = codes.view(-1, block_size // 2).to(torch.int32)
    return torch.cat([byte & 15, byte >> 4], dim=1)


def _pack(q: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """int32 codes (blocks, block_size) -> stored codes (flat)."""
    if bits == 8:
        return q.to(torch.int8 if signed else torch.uint8).reshape(-1)
    half = q.shape[1] // 2
    return (q[:, :half] | (q[:, half:] << 4)).to(torch.uint8).reshape(-1)


def decode(codes: torch.Tensor, scale: torch.Tensor, bits: int, block_size: int, signed: bool) -> torch.Tensor:
    """fp32 values, shape (blocks, block_size)."""
    q = _unpack(codes, bits, block_size)
    if signed:
        if bits == 4:
            q = q - NIBBLE_OFFSET
        r = q.to(torch.float32) * _f32(1.0 / SIGNED_MAX[bits])
        return (r * r.abs()) * scale[:, None]
    r = (q + 1).to(torch.float32) * _f32(1.0 / UNSIGNED_LEVELS[bits])
    r2 = r * r
    return (r2 * r2) * scale[:, None]


def _f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def _threshold(j: torch.Tensor, inv: float, power: int) -> torch.Tensor:
    """The value at which code j starts: ((j - 0.5) * inv) ** power, in fp32 multiplications."""
    a = (j - 0.5) * _f32(inv)
    a2 = a * a
    return a2 if power == 2 else a2 * a2


def _count(t: torch.Tensor, estimate: torch.Tensor, top: int, inv: float, power: int) -> torch.Tensor:
    """The number of thresholds 1..top at or below t, from an estimate that is off by at most one."""
    j = estimate.clamp(0.0, float(top))
    j = torch.where((j > 0) & (t < _threshold(j, inv, power)), j - 1.0, j)
    j = torch.where((j < top) & (t >= _threshold(j + 1.0, inv, power)), j + 1.0, j)
    return j


def encode(x: torch.Tensor, bits: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 values (blocks, block_size) -> (stored codes, fp32 scales).

    A code is the count of thresholds (midpoints between levels, in the companded domain) at or below the value
    relative to the block's scale; a square root gives an estimate off by at most one and exact comparisons settle
    it, so any square root (the kernel's is approximate) gives the same codes.
    """
    mag = x.abs() if signed else x
    scale = mag.amax(dim=1)
    inv = torch.where(scale > 0, 1.0 / torch.where(scale > 0, scale, 1.0), 0.0)
    t = mag * inv[:, None]
    if signed:
        top = SIGNED_MAX[bits]
        q = _count(t, torch.floor(torch.sqrt(t) * float(top) + 0.5), top, 1.0 / top, 2)
        q = torch.where(x < 0, -q, q).to(torch.int32)
        if bits == 4:
            q = q + NIBBLE_OFFSET
    else:
        levels = UNSIGNED_LEVELS[bits]
        j = _count(t, torch.floor(torch.sqrt(torch.sqrt(t)) * float(levels) + 0.5), levels, 1.0 / levels, 4)
        q = (j - 1.0).clamp(min=0.0).to(torch.int32)
    return _pack(q, bits, signed), scale
