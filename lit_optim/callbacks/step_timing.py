"""`StepTimingMonitor`: how long the optimizer step takes, and its share of the training step.

Lightning has no hook after the optimizer step, and in automatic optimization the forward and backward run *inside*
``optimizer.step(closure)``: the closure Lightning passes runs ``training_step``, backward, ``on_before_optimizer_step``
and gradient clipping, and only then does the optimizer update the parameters. So the monitor registers a step
pre-hook that wraps the closure (to mark where it returns) and a post-hook (to mark the end of the update) on each
optimizer -- torch's `register_step_pre_hook` / `register_step_post_hook`, or, for optimizers that never ran
``Optimizer.__init__`` (torchao's `CPUOffloadOptimizer`), a wrapper around the instance's ``step``.

Marks are CUDA events on a GPU (recorded in stream order, read only on logging steps: no host synchronisation
otherwise) and ``time.perf_counter`` on a CPU.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only

from lit_optim.callbacks._common import IntervalCallback, logging_step


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), or None where that cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rpartition(")")[2].split()[19])  # field 22, after the command name
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class _Clock:
    """Marks and the milliseconds between them: CUDA events (no sync until `wait`) or the host clock."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self._free: list[Any] = []

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = self._free.pop() if self._free else torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def wait(self, mark) -> None:
        if self.cuda and mark is not None:
            mark.synchronize()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1000.0

    def release(self, marks) -> None:
        if self.cuda:
            self._free.extend(m for m in marks if m is not None)


class _Batch:
    __slots__ = ("start", "prev_end", "end", "updates", "depth")

    def __init__(self, start, prev_end) -> None:
        self.start, self.prev_end, self.end = start, prev_end, None
        self.updates: list[list[Any]] = []  # [step entered, closure returned or None, step returned or None]
        self.depth = 0  # nested step calls of one optimizer (a subclass's step calling its parent's)

    def marks(self):
        yield from (self.prev_end, self.start, self.end)
        for u in self.updates:
            yield from u


class StepTimingMonitor(IntervalCallback):
    """Times the optimizer step, forward+backward and data wait; the first steps are reported on their own.

    Segments of one training batch (``on_train_batch_start`` to ``on_train_batch_end``):
    forward+backward runs from the batch start to where the optimizer update begins (the return of the closure
    Lightning hands to ``optimizer.step``, so it includes ``on_before_optimizer_step`` and gradient clipping; without a
    closure, the entry into ``step``); the optimizer step from there to the return of ``step``. Data wait runs from
    the end of the previous batch to the start of this one (within an epoch, not across validation). On a GPU these
    are CUDA-event intervals: time on the GPU's stream, so data wait is the loading the GPU actually waited for.
    Optimizers that update during backward (the ``*_layerwise`` names, LOMO) do their work inside forward+backward;
    their optimizer step is near zero by design.

    Logged metrics (means over the optimizer steps of the logging interval, warm-up steps excluded):
        ``timing/train_step_ms``: whole training batch.
        ``timing/forward_backward_ms``: forward + backward (and clipping).
        ``timing/optimizer_step_ms``: the optimizer update; ``timing/optimizer_step_ms_max``: its slowest step.
        ``timing/optimizer_step_share``: optimizer step time / training step time (sums over the interval).
        ``timing/data_wait_ms``: wait for the batch.
        ``timing/steps``: optimizer steps averaged.
    Once, after the first optimizer step (one device synchronisation):
        ``timing/launch_to_first_step_s``: wall time from the start of this process to the end of the first
        optimizer step -- imports, model build, data, compilation and the step itself: what a user waits for.
    Once, when the warm-up steps are over (torch.compile of torchao's step, CUDA/cuBLAS start-up):
        ``timing/warmup/first_optimizer_step_ms``, ``timing/warmup/first_train_step_ms``: the very first step;
        ``timing/warmup/optimizer_step_ms``, ``timing/warmup/train_step_ms``: means over the warm-up steps;
        ``timing/warmup/steps``.

    Args:
        log_every_n_steps: logging interval in optimizer steps; None follows ``Trainer(log_every_n_steps)``.
        warmup_steps: the first optimizer steps, reported apart and never averaged in.
        cuda_events: time with CUDA events (default: when training on a CUDA device).
    """

    def __init__(self, log_every_n_steps: int | None = None, warmup_steps: int = 3,
                 cuda_events: bool | None = None) -> None:
        super().__init__(log_every_n_steps)
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative integer, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        self.cuda_events = cuda_events
        self._clock: _Clock | None = None
        self._pending: list[_Batch] = []
        self._current: _Batch | None = None
        self._prev_end = None
        self._steps_seen = 0  # optimizer steps timed since training started
        self._last_step = 0  # Lightning's logging step of the last batch timed
        self._warmup: list[_Batch] = []
        self._undo: list[Any] = []

    # --- instrumentation of the optimizers ---------------------------------------------------------------------

    def _pre(self, optimizer, args, kwargs):
        batch = self._current
        if batch is None:
            return None
        batch.depth += 1
        if batch.depth > 1:  # the parent class's hooked step inside the subclass's: already timed
            return None
        update = [self._clock.mark(), None, None]
        batch.updates.append(update)
        closure = kwargs.get("closure", args[0] if args else None)
        if closure is None:
            return None
        clock = self._clock

        def timed_closure(*a, **kw):
            out = closure(*a, **kw)
            update[1] = clock.mark()
            return out

        if "closure" in kwargs:
            kwargs = {**kwargs, "closure": timed_closure}
        else:
            args = (timed_closure, *args[1:])
        return args, kwargs

    def _post(self, optimizer, args, kwargs) -> None:
        batch = self._current
        if batch is None or batch.depth == 0:
            return
        batch.depth -= 1
        if batch.depth == 0 and batch.updates and batch.updates[-1][2] is None:
            batch.updates[-1][2] = self._clock.mark()

    def _instrument(self, optimizer) -> None:
        if hasattr(optimizer, "_optimizer_step_pre_hooks"):
            self._undo.append(optimizer.register_step_pre_hook(self._pre))
            self._undo.append(optimizer.register_step_post_hook(self._post))
            return
        # No Optimizer.__init__ (so no hook registry, and step() is not wrapped to run hooks): wrap the instance.
        had_own = "step" in vars(optimizer)
        original = optimizer.step

        def step(*args, **kwargs):
            changed = self._pre(optimizer, args, kwargs)
            if changed is not None:
                args, kwargs = changed
            out = original(*args, **kwargs)
            self._post(optimizer, args, kwargs)
            return out

        optimizer.step = step

        class _Restore:
            def remove(self_inner) -> None:
                if had_own:
                    optimizer.step = original
                else:
                    vars(optimizer).pop("step", None)

        self._undo.append(_Restore())

    def _remove_instrumentation(self) -> None:
        for handle in self._undo:
            handle.remove()
        self._undo.clear()

    # --- Lightning hooks -------------------------------------------------------------------------------------------

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        use_cuda = trainer.strategy.root_device.type == "cuda" if self.cuda_events is None else self.cuda_events
        self._clock = _Clock(bool(use_cuda) and torch.cuda.is_available())
        self._pending, self._warmup, self._current, self._prev_end, self._steps_seen = [], [], None, None, 0
        self._last_step = 0
        self._remove_instrumentation()
        for optimizer in trainer.optimizers:
            self._instrument(optimizer)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._prev_end = None  # the first batch of an epoch waits for the loader to start: not a steady-state wait

    def on_validation_start(self, trainer, pl_module) -> None:
        self._prev_end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._clock is not None:
            self._current = _Batch(self._clock.mark(), self._prev_end)

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        current, clock = self._current, self._clock
        if current is None or clock is None:
            return
        current.end = self._prev_end = clock.mark()
        self._current = None
        self._last_step = logging_step(trainer)
        in_warmup = self._steps_seen < self.warmup_steps
        if any(u[2] is not None for u in current.updates):
            self._steps_seen += 1
            if self._steps_seen == 1:
                if self._clock.cuda:
                    torch.cuda.synchronize()  # once per fit: the step must have ended, not just been queued
                age = process_age_s()
                if age is not None:
                    self.publish(trainer, {"timing/launch_to_first_step_s": age}, step=self._last_step)
        if in_warmup:
            self._warmup.append(current)
            if self._steps_seen >= self.warmup_steps:
                self._flush_warmup(trainer)
            return
        self._pending.append(current)
        if self.is_log_step(trainer):
            self.flush(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            if self._warmup:
                self._flush_warmup(trainer)
            if self._pending:
                self.flush(trainer)
        self._remove_instrumentation()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._remove_instrumentation()

    # --- reading the marks -----------------------------------------------------------------------------------------

    def _segments(self, b: _Batch) -> dict[str, float]:
        ms = self._clock.ms
        out = {"train_step": ms(b.start, b.end)}
        done = [u for u in b.updates if u[2] is not None]
        if done:
            first_update_start = done[0][1] if done[0][1] is not None else done[0][0]
            out["forward_backward"] = ms(b.start, first_update_start)
            out["optimizer_step"] = sum(ms(u[1] if u[1] is not None else u[0], u[2]) for u in done)
        else:  # accumulating gradients: the whole batch is forward + backward
            out["forward_backward"] = out["train_step"]
        if b.prev_end is not None:
            out["data_wait"] = ms(b.prev_end, b.start)
        return out

    def _read(self, batches: list[_Batch]) -> list[dict[str, float]]:
        self._clock.wait(batches[-1].end)
        rows = [self._segments(b) for b in batches]
        # A mark is shared as one batch's end and the next one's prev_end: release each event once, and keep the
        # last end, which the next batch measures its data wait from.
        marks = {id(m): m for b in batches for m in b.marks() if m is not None and m is not self._prev_end}
        self._clock.release(marks.values())
        return rows

    def _flush_warmup(self, trainer) -> None:
        rows, self._warmup = self._read(self._warmup), []
        stepped_rows = [r for r in rows if "optimizer_step" in r]
        if not stepped_rows:
            return
        metrics = {
            "timing/warmup/first_optimizer_step_ms": stepped_rows[0]["optimizer_step"],
            "timing/warmup/first_train_step_ms": rows[0]["train_step"],
            "timing/warmup/optimizer_step_ms": sum(r["optimizer_step"] for r in stepped_rows) / len(stepped_rows),
            "timing/warmup/train_step_ms": sum(r["train_step"] for r in rows) / len(rows),
            "timing/warmup/steps": len(stepped_rows),
        }
        self.warmup_metrics = metrics
        self.publish(trainer, metrics, step=self._last_step)

    def flush(self, trainer) -> dict[str, float]:
        """Read the pending marks (one host sync) and log the interval's means."""
        if not self._pending:
            return {}
        rows, self._pending = self._read(self._pending), []
        stepped_rows = [r for r in rows if "optimizer_step" in r]
        train = sum(r["train_step"] for r in rows)
        metrics = {
            "timing/train_step_ms": train / len(rows),
            "timing/forward_backward_ms": sum(r["forward_backward"] for r in rows) / len(rows),
            "timing/steps": len(stepped_rows),
        }
        if stepped_rows:
            opt = [r["optimizer_step"] for r in stepped_rows]
            metrics["timing/optimizer_step_ms"] = sum(opt) / len(opt)
            metrics["timing/optimizer_step_ms_max"] = max(opt)
            metrics["timing/optimizer_step_share"] = sum(opt) / train if train > 0 else 0.0
        waits = [r["data_wait"] for r in rows if "data_wait" in r]
        if waits:
            metrics["timing/data_wait_ms"] = sum(waits) / len(waits)
        self.publish(trainer, metrics, step=self._last_step)
        return metrics
