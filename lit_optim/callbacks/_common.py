"""What the monitoring callbacks share: when to log, where to log, and the built optimizers' records."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn


def logging_step(trainer) -> int:
    """The step Lightning logs the current batch's metrics at (what ``self.log`` in `training_step` uses)."""
    loop = getattr(trainer, "fit_loop", None)
    return int(getattr(getattr(loop, "epoch_loop", None), "_batches_that_stepped", trainer.global_step))


def stepped(trainer) -> bool:
    """Whether the batch now ending ran an optimizer step (False while gradients accumulate)."""
    try:
        return not trainer.fit_loop._should_accumulate()
    except Exception:  # noqa: BLE001 - private API; assume a step
        return True


def emit(trainer, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Send `metrics` to every logger of the trainer (CSV, TensorBoard, W&B ...), at Lightning's logging step."""
    if not metrics or not trainer.loggers:
        return
    step = logging_step(trainer) if step is None else step
    clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    for logger in trainer.loggers:
        try:
            logger.log_metrics(clean, step=step)
        except Exception as err:  # noqa: BLE001 - a logger that fails (W&B gone, disk full) must not stop training
            _warn_once(("log_metrics", type(logger).__name__),
                       f"lit_optim: {type(logger).__name__} could not log monitoring metrics "
                       f"({type(err).__name__}: {err}); training goes on.")


_warned: set[tuple[str, str]] = set()


def _warn_once(key: tuple[str, str], message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        rank_zero_warn(message)


class IntervalCallback(Callback):
    """Base for callbacks that log every `log_every_n_steps` optimizer steps (None: the trainer's interval)."""

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        super().__init__()
        if log_every_n_steps is not None and (not isinstance(log_every_n_steps, int) or log_every_n_steps < 0):
            raise ValueError(f"log_every_n_steps must be a non-negative integer or None, got {log_every_n_steps!r}")
        self.log_every_n_steps = log_every_n_steps
        self.last_metrics: dict[str, float] = {}  # what was logged last (also without any logger)

    def interval(self, trainer) -> int:
        return trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps

    def is_log_step(self, trainer) -> bool:
        """True in `on_train_batch_end` of a batch that stepped and ends a logging interval (as Lightning counts)."""
        n = self.interval(trainer)
        return bool(n) and stepped(trainer) and (logging_step(trainer) + 1) % n == 0

    def publish(self, trainer, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.last_metrics = dict(metrics)
        emit(trainer, metrics, step)


class SnapshotCallback(IntervalCallback):
    """Logs `measure(trainer)` after the first optimizer step of a fit, then at the end of each logging interval."""

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        super().__init__(log_every_n_steps)
        self._first_logged = False

    def measure(self, trainer) -> dict[str, float]:
        raise NotImplementedError

    def on_train_start(self, trainer, pl_module) -> None:
        self._first_logged = False

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        first = not self._first_logged and trainer.global_step >= 1
        if first or self.is_log_step(trainer):
            self._first_logged = True
            self.publish(trainer, self.measure(trainer))


def state_reports(trainer) -> list:
    """`state_report` of each optimizer, computed once per optimizer step however many monitors ask."""
    from lit_optim.state_bytes import state_report

    cached = trainer.__dict__.get("_lit_optim_state_reports")
    if cached is not None and cached[0] == trainer.global_step and len(cached[1]) == len(trainer.optimizers):
        return cached[1]
    reports = [state_report(opt) for opt in trainer.optimizers]
    trainer.__dict__["_lit_optim_state_reports"] = (trainer.global_step, reports)
    return reports


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def build_records(trainer) -> dict[str, dict[str, Any]]:
    """``optimizer.lit_optim.record()`` of each optimizer lit_optim built: ``{"optimizer_built": {...}}`` (then
    ``optimizer_built_1`` ... for further optimizers), with plain JSON/YAML values."""
    out = {}
    for i, opt in enumerate(trainer.optimizers):
        info = getattr(opt, "lit_optim", None)
        if info is not None:
            record = info.record()
            if record.get("block_size") is None and isinstance(getattr(opt, "block_size", None), int):
                record["block_size"] = opt.block_size  # the class default in effect (torchao)
            out["optimizer_built" + (f"_{i}" if i else "")] = _jsonable(record)
    return out


def record_hyperparams(trainer, params: Mapping[str, Any]) -> None:
    """Add `params` to every logger's hyperparameters (W&B config, CSV hparams.yaml, TensorBoard); never raises."""
    for logger in trainer.loggers:
        try:
            logger.log_hyperparams(dict(params))
        except Exception as err:  # noqa: BLE001 - a logger's trouble must not stop training
            _warn_once(("log_hyperparams", type(logger).__name__),
                       f"lit_optim: {type(logger).__name__} could not record {sorted(params)}: {err}")


def log_build_records(trainer) -> dict[str, dict[str, Any]]:
    """Record what was built in every logger's hyperparameters."""
    records = build_records(trainer)
    if records:
        record_hyperparams(trainer, records)
    return records
