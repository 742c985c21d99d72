"""Warmup + cosine / linear / constant learning-rate schedules, stepped once per optimizer step.

One `LRScheduler` whose factor is `lr_factor`, so warmup and decay read the same in every run and in the logs.
torchao stores each group's learning rate as a tensor (it must be updated in place); `LRScheduler.step` writes through
``fill_`` there. Base rates are kept as floats so checkpoints and logs hold plain numbers. (Early torch 2.x
schedulers kept torchao's lr tensor itself as the base and compounded on it; torch 2.13's ``LambdaLR`` gives exact
values, checked in tests/test_scheduler.py.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from lit_optim.errors import HyperparameterError

SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(step: int, *, schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


class WarmupSchedule(LRScheduler):
    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        schedule: str = "cosine",
        total_steps: int,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        self.schedule, self.total_steps = schedule, int(total_steps)
        self.warmup_steps, self.min_lr_ratio = int(warmup_steps), float(min_lr_ratio)
        for group in optimizer.param_groups:
            # A float base rate: plain numbers in the checkpoint and in `base_lrs`.
            group.setdefault("initial_lr", float(group["lr"]))
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        factor = lr_factor(
            self.last_epoch, schedule=self.schedule, warmup_steps=self.warmup_steps,
            total_steps=self.total_steps, min_lr_ratio=self.min_lr_ratio,
        )
        return [float(base) * factor for base in self.base_lrs]


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: Mapping[str, Any], total_steps: int
) -> WarmupSchedule:
    """`config`: ``name`` (constant/linear/cosine), ``warmup_steps`` or ``warmup_ratio``, ``min_lr_ratio``."""
    cfg = dict(config)
    name = cfg.pop("name", "cosine")
    if name not in SCHEDULES:
        raise HyperparameterError(f"Unknown LR schedule {name!r}; choose one of {', '.join(SCHEDULES)}.")
    warmup_steps = cfg.pop("warmup_steps", None)
    warmup_ratio = cfg.pop("warmup_ratio", 0.0)
    min_lr_ratio = cfg.pop("min_lr_ratio", 0.0)
    if cfg:
        raise HyperparameterError(
            f"LR scheduler does not take {sorted(cfg)}; it takes name, warmup_steps, warmup_ratio, min_lr_ratio."
        )
    if warmup_steps is not None and warmup_ratio:
        raise HyperparameterError("Give either scheduler.warmup_steps or scheduler.warmup_ratio, not both.")
    if not 0.0 <= float(warmup_ratio) < 1.0 or not 0.0 <= float(min_lr_ratio) <= 1.0:
        raise HyperparameterError("scheduler.warmup_ratio must be in [0, 1) and min_lr_ratio in [0, 1].")
    if warmup_steps is None:
        warmup_steps = int(round(float(warmup_ratio) * total_steps))
    return WarmupSchedule(
        optimizer, schedule=name, total_steps=total_steps, warmup_steps=int(warmup_steps),
        min_lr_ratio=float(min_lr_ratio),
    )
