"""Hyperparameter values checked one way for every backend, and what a name will really build for this model.

Backends disagree on bad values: one accepts a NaN learning rate or a negative weight decay and trains to NaN, another
raises a bare ValueError from its constructor. Every value is checked here first, with one message per problem that
names the optimizer, the key and the fix. Then the claim of the name is checked against the model: an "8-bit" name
whose block size divides no tensor keeps fp32 state everywhere, and a low-rank projection whose rank reaches the
weight's smaller side is full rank (more state than AdamW). Caused by the user's own setting, that is refused; from
the defaults on a small model, warned about with the numbers.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from lit_optim.errors import HyperparameterError
from lit_optim.optimizers.lowrank import LowRankOptimizer
from lit_optim.spec import OptimizerSpec

log = logging.getLogger("lit_optim")

# key -> (lowest, lowest included?, highest, highest included?, what it is)
RANGES: Mapping[str, tuple[float, bool, float, bool, str]] = {
    "lr": (0.0, True, math.inf, False, "a learning rate"),
    "weight_decay": (0.0, True, math.inf, False, "a decay rate"),
    "eps": (0.0, False, math.inf, False, "a positive constant added for numerical stability"),
    "betas": (0.0, True, 1.0, False, "decay rates of moving averages"),
    "beta1": (0.0, True, 1.0, False, "a decay rate of a moving average"),
    "beta2": (0.0, True, 1.0, False, "a decay rate of a moving average"),
    "momentum": (0.0, True, 1.0, False, "a momentum factor"),
    "block_size": (1.0, True, math.inf, False, "elements per quantization block"),
    "min_8bit_size": (0.0, True, math.inf, False, "a tensor size"),
    "rank": (1.0, True, math.inf, False, "a projection rank"),
    "update_proj_gap": (1.0, True, math.inf, False, "a number of steps"),
}
INTEGER_KEYS = {"block_size", "min_8bit_size", "rank", "update_proj_gap"}


def _numbers(value: Any) -> list[float] | None:
    """The numbers in `value` (a number, a one-element tensor, or a list of them); None if it holds none."""
    items = value if isinstance(value, (tuple, list)) else (value,)
    out = []
    for item in items:
        if isinstance(item, bool) or item is None:
            continue
        if isinstance(item, torch.Tensor) and item.numel() == 1:
            out.append(float(item))
        elif isinstance(item, (int, float)):
            out.append(float(item))
    return out or None


def check_values(spec: OptimizerSpec, kwargs: Mapping[str, Any]) -> None:
    """Every number finite, every known key in its range, sizes and ranks whole numbers."""
    for key, value in kwargs.items():
        numbers = _numbers(value)
        if numbers is None:
            continue
        where = f"Optimizer {spec.name!r}: {key}={value!r}"
        if any(math.isnan(x) or math.isinf(x) for x in numbers):
            raise HyperparameterError(f"{where} is not a finite number; training on it would turn every weight "
                                      "into NaN. Give a finite value.")
        if key in INTEGER_KEYS and any(x != int(x) for x in numbers):
            raise HyperparameterError(f"{where} must be a whole number.")
        if key not in RANGES:
            continue
        low, low_in, high, high_in, meaning = RANGES[key]
        for x in numbers:
            if x < low or (x == low and not low_in) or x > high or (x == high and not high_in):
                if math.isinf(high):
                    span = f"{'>=' if low_in else '>'} {low:g}"
                else:
                    span = f"in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
                raise HyperparameterError(f"{where} is out of range: {meaning} must be {span}.")


def _say(message: str) -> None:
    log.warning(message)
    warnings.warn(message, UserWarning, stacklevel=3)


def quantized_share(spec: OptimizerSpec, kwargs: Mapping[str, Any], params: list[torch.Tensor],
                    fp32: Iterable[torch.Tensor] = ()) -> float | None:
    """Share of the parameters whose state `spec` quantizes with these settings; None for names that do not."""
    if spec.builder is not None or spec.bits is None or spec.bits >= 16:
        return None
    total = sum(p.numel() for p in params)
    if not total:
        return None
    if spec.backend == "torchao":  # torchao: tensors of >= 4096 elements that the block size divides
        block = int(kwargs.get("block_size") or 1)
        kept = [p for p in params if p.numel() >= 4096 and p.numel() % block == 0]
    elif spec.backend == "bitsandbytes":  # bitsandbytes: tensors of >= min_8bit_size elements, less those kept 32-bit
        least = kwargs.get("min_8bit_size", 4096)
        skip = {id(p) for p in fp32}
        kept = [p for p in params if p.numel() >= least and id(p) not in skip]
    else:
        return None
    return sum(p.numel() for p in kept) / total


def check_quantized(spec: OptimizerSpec, kwargs: Mapping[str, Any], params: list[torch.Tensor],
                    user_keys: Iterable[str], fp32: Iterable[torch.Tensor] = ()) -> None:
    """A low-bit name must quantize something: refused when the user's own setting prevents it, else warned."""
    share = quantized_share(spec, kwargs, params, fp32)
    if share is None or share >= 0.5:
        return
    setting = next((k for k in ("block_size", "min_8bit_size") if k in set(user_keys) and k in kwargs), None)
    what = f"{spec.bits}-bit state for {share:.0%} of the parameters; the rest keep fp32 state (8 B/param for Adam)"
    if share == 0 and setting is not None:
        fix = ("a power of two such as 256 that divides the weights' sizes" if setting == "block_size"
               else "the default 4096")
        raise HyperparameterError(
            f"Optimizer {spec.name!r} with {setting}={kwargs[setting]!r} would quantize no tensor of this model: "
            f"{what}, under a {spec.bits}-bit name. Use {fix}.")
    _say(f"Optimizer {spec.name!r} keeps {what}: most tensors of this model are too small"
         + (f" or not divisible by block_size={kwargs.get('block_size')}" if spec.backend == "torchao" else "")
         + ". Expect less saving than the name suggests.")


def _lowrank_parts(optimizer) -> list[LowRankOptimizer]:
    found, todo = [], [optimizer]
    while todo:
        opt = todo.pop()
        if isinstance(opt, LowRankOptimizer):
            found.append(opt)
        inner = getattr(opt, "lit_optim_inner_optimizers", None)
        if callable(inner) and not isinstance(opt, LowRankOptimizer):
            todo.extend(inner())
    return found


def check_rank(spec: OptimizerSpec, optimizer, user_keys: Iterable[str]) -> None:
    """A projection whose rank reaches a weight's smaller side saves nothing there (it adds the projector): warned
    with the numbers; refused when the user's rank exceeds every projected weight's smaller side."""
    full, targets, widest, rank = 0, 0, 0, 0  # widest: the largest smaller side among the targets
    for part in _lowrank_parts(optimizer):
        rank = int(part.param_groups[0]["rank"])
        for p in part.targets:
            targets += 1
            widest = max(widest, min(p.shape))
            full += rank >= min(p.shape)
    if not full:
        return
    what = (f"rank={rank} reaches the smaller side of {full} of {targets} projected weights (the largest smaller "
            f"side is {widest}): those keep full-rank state plus a projector, more than AdamW")
    if full == targets and rank > widest and "rank" in set(user_keys):  # no weight is even as wide as the rank
        raise HyperparameterError(f"Optimizer {spec.name!r}: {what}. Use rank < {widest}, e.g. {max(1, widest // 4)}.")
    _say(f"Optimizer {spec.name!r}: {what}. A smaller rank (below {widest}) projects them.")
