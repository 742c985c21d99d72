"""State-size theory: how many bytes of optimizer state each backend keeps for a parameter of `n` elements.

Each theory is `theory(shape, hyperparameters) -> bytes` for one parameter tensor of that shape.
These formulas are the claims the registry makes; tests compare them with the real storages of built optimizers, and
the state-memory callback reports both. Small tensors fall back to fp32 state in torchao and bitsandbytes, and the
formulas say so. Per-optimizer constants (a scalar `step`, bitsandbytes' shared quantization maps) are left out: they
do not grow with the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

FP32 = 4
Shape = tuple[int, ...]


def fp32_states(count: int):
    """`count` full-precision fp32 tensors shaped like the parameter (AdamW: 2, Lion/Adagrad/momentum: 1)."""

    def theory(shape: Shape, hp: Mapping[str, Any]) -> float:
        n = math.prod(shape)
        return count * FP32 * n

    return theory


def no_state(shape: Shape, hp: Mapping[str, Any]) -> float:
    return 0.0


def sgd_like(shape: Shape, hp: Mapping[str, Any]) -> float:
    n = math.prod(shape)
    return FP32 * n if hp.get("momentum", 0) else 0.0


def rmsprop_like(shape: Shape, hp: Mapping[str, Any]) -> float:
    n = math.prod(shape)
    tensors = 1 + bool(hp.get("momentum", 0)) + bool(hp.get("centered", False))
    return tensors * FP32 * n


def factored_second_moment(shape: Shape, hp: Mapping[str, Any]) -> float:
    """torch Adafactor: row and column statistics for a matrix, a full vector otherwise."""
    n = math.prod(shape)
    if len(shape) >= 2:
        return FP32 * (n // shape[-1] + n // shape[-2])
    return FP32 * n


# --- torchao: OptimState subclasses, low-bit only for >= 4096 elements divisible by block_size ---------------------
_TORCHAO_CODE_BYTES = {8: 1.0, 4: 0.5, "fp8": 1.0}
_TORCHAO_QMAP_BYTES = {8: 256 * FP32, 4: 16 * FP32, "fp8": 0}
TORCHAO_DEFAULT_BLOCK = {8: 256, 4: 128, "fp8": 256}


def torchao_states(count: int, kind: int | str):
    def theory(shape: Shape, hp: Mapping[str, Any]) -> float:
        n = math.prod(shape)
        block = hp.get("block_size") or TORCHAO_DEFAULT_BLOCK[kind]
        if n < 4096 or n % block:
            return count * FP32 * n
        per_state = _TORCHAO_CODE_BYTES[kind] * n + FP32 * (n // block) + _TORCHAO_QMAP_BYTES[kind]
        return count * per_state

    return theory


# --- bitsandbytes: blockwise 8-bit (block 256) for >= min_8bit_size elements ------------------------------------------
BNB_BLOCK = 256


def bnb_states(count: int, bits: int, min_8bit_default: int = 4096):
    """`count` states; bits == 8 quantizes each to uint8 plus one fp32 absmax per 256 elements."""

    def theory(shape: Shape, hp: Mapping[str, Any]) -> float:
        n = math.prod(shape)
        if bits == 32 or n < hp.get("min_8bit_size", min_8bit_default):
            return count * FP32 * n
        return count * (n + FP32 * math.ceil(n / BNB_BLOCK))

    return theory


def bnb_sgd(bits: int):
    def theory(shape: Shape, hp: Mapping[str, Any]) -> float:
        return bnb_states(1, bits)(shape, hp) if hp.get("momentum", 0) else 0.0

    return theory


# --- lit_optim fused low-bit optimizers: every tensor padded to whole blocks, one fp32 scale per block ----------
FUSED_DEFAULT_BLOCK = {8: 256, 4: 256}


def fused_lowbit_states(count: int, bits: int):
    def theory(shape: Shape, hp: Mapping[str, Any]) -> float:
        block = hp.get("block_size") or FUSED_DEFAULT_BLOCK[bits]
        blocks = max(1, math.ceil(math.prod(shape) / block))
        return count * blocks * (block * bits / 8 + FP32)

    return theory


# --- FlashOptim: every tensor's moments as 8-bit codes with one fp16 scale per 32 values, whatever its size -----------
FLASH_GROUP = 32
# Set by `lit_optim.state_theory` for a real parameter: its element size. The theories count fp32 without it.
PARAM_BYTES = "param_bytes"


def flash_states(count: int, *, only_with_momentum: bool = False):
    """`count` moments: 1-byte codes plus a 2-byte scale per 32 elements when ``quantize`` (the default), else kept in
    the parameter's dtype; plus the error-correction bits that lift a 16-bit parameter to ``master_weight_bits``
    (24: 1 byte, 32: 2 bytes; none for fp32 parameters or null). SGD keeps its moment only with momentum."""

    def theory(shape: Shape, hp: Mapping[str, Any]) -> float:
        n = math.prod(shape)
        width = hp.get(PARAM_BYTES, FP32)
        moments = 0 if only_with_momentum and not hp.get("momentum", 0) else count
        per_moment = n + 2 * math.ceil(n / FLASH_GROUP) if hp.get("quantize", True) else width * n
        bits = hp.get("master_weight_bits", 24)
        correction = max(0, int(bits) // 8 - width) if bits else 0
        return moments * per_moment + correction * n

    return theory
