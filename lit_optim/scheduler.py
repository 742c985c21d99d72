"""Warmup + cosine / linear / constant learning-rate schedules, stepped once per optimizer step.

One `LRScheduler` whose factor is `lr_factor`, so warmup and decay read the same in every run and in the logs.
torchao stores each group's learning rate as a tensor (it must be updated in place); `LRScheduler.step` writes through
``fill_`` there. Base rates are kept as floats so checkpoints and logs hold plain numbers. (Early torch 2.x
schedulers kept torchao's lr tensor itself as the base and compounded on it; torch 2.13's ``LambdaLR`` gives exact
values, checked in tests/test_scheduler.py.)

Resuming with another length (``max_steps`` 300 -> 600) reshapes the schedule: it keeps its position (the step count)
and base learning rates from the checkpoint and takes its shape -- length, warmup, floor, kind -- from the run being
started, as if that run had been planned from step 0. Restoring the old shape too (what ``LRScheduler`` does with
every attribute) would hold the LR at the old schedule's end -- 0 for a cosine to 0 -- for every added step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.optim.lr_scheduler import LRScheduler

from lit_optim.errors import HyperparameterError
from lit_optim.optimizers.composite import set_group_value

SCHEDULES = ("constant", "linear", "cosine")
SHAPE = ("schedule", "total_steps", "warmup_steps", "min_lr_ratio")  # from the run's config, not the checkpoint


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

    def factor(self) -> float:
        return lr_factor(
            self.last_epoch, schedule=self.schedule, warmup_steps=self.warmup_steps,
            total_steps=self.total_steps, min_lr_ratio=self.min_lr_ratio,
        )

    def get_lr(self) -> list[float]:
        factor = self.factor()
        return [float(base) * factor for base in self.base_lrs]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        saved = {key: state.pop(key) for key in SHAPE if key in state}
        super().load_state_dict(state)
        current = {key: getattr(self, key) for key in SHAPE}
        if all(saved.get(key, value) == value for key, value in current.items()):
            return  # the same shape: the optimizer's restored LR is already this schedule's
        # Lightning restores the optimizer (whose LR is the old schedule's next value) before the scheduler; the next
        # step must use the new shape's value instead.
        values = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, values):
            set_group_value(group, "lr", lr)  # torchao's tensor LR in place
        self._last_lr = list(values)
        changed = ", ".join(f"{k} {saved[k]} -> {current[k]}" for k in SHAPE if k in saved and saved[k] != current[k])
        rank_zero_info(f"lit_optim: resumed LR schedule reshaped to this run ({changed}); the LR factor "
                       f"at step {self.last_epoch + 1} is {self.factor():.4g} of the base LR.")


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
