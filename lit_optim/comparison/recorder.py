"""`ComparisonRecorder`: what a `lit-optim compare` run logs beyond the monitors, and the CSV the comparison reads.

`lit-optim compare` adds it to each run (``+callbacks.comparison_recorder``); it is not one of the default monitors.
"""

from __future__ import annotations

import time

import torch

from lit_optim.callbacks._common import SnapshotCallback
from lit_optim.callbacks.step_timing import process_age_s

# Optimizers that step each parameter in its gradient hook and free the gradient at once: no gradient buffer.
STEPS_IN_BACKWARD = ("InBackwardOptimizer", "Lomo", "AdaLomo")


def weight_and_grad_bytes(pl_module, optimizers) -> tuple[int, int]:
    """Bytes of the module's parameters (each storage once, frozen ones included) and of the gradients an optimizer
    step holds: one per trainable parameter in its dtype, none for optimizers that step in backward."""
    params = {p.untyped_storage().data_ptr(): p for p in pl_module.parameters()}
    weights = sum(p.untyped_storage().nbytes() for p in params.values())
    in_backward = any(type(opt).__name__ in STEPS_IN_BACKWARD for opt in optimizers)
    grads = 0 if in_backward else sum(p.numel() * p.element_size() for p in params.values() if p.requires_grad)
    return weights, grads


class ComparisonRecorder(SnapshotCallback):
    """Logs, after the first optimizer step and every logging interval (the steps ``train/loss`` is logged at):

    ``time/since_launch_s``: seconds since the process started (the x axis of loss against wall time; the first
    point is ``timing/launch_to_first_step_s``, so start-up and compilation count, as a user waits for them).
    ``model/weight_bytes``, ``model/grad_bytes``: see `weight_and_grad_bytes` (the comparison's memory plot).

    With any logger other than CSV (W&B, TensorBoard) or none, it adds a `CSVLogger` under the run directory
    (``comparison_csv/``), so the comparison reads every run the same way; the other logger logs as usual.
    """

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        super().__init__(log_every_n_steps)
        # The process's age is read in clock ticks (10 ms); steps are timed from here with the precise clock.
        self._launch = (process_age_s(), time.perf_counter())

    def setup(self, trainer, pl_module, stage: str) -> None:
        from lightning.pytorch.loggers import CSVLogger

        if stage == "fit" and not any(isinstance(lg, CSVLogger) for lg in trainer.loggers):
            # Flushed every logging step: a run that stops half-way (out of memory) still shows how far it got.
            trainer.loggers = [*trainer.loggers, CSVLogger(trainer.default_root_dir, name="comparison_csv",
                                                           flush_logs_every_n_steps=1)]

    def measure(self, trainer) -> dict[str, float]:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # the loss logged at this step has been computed: the time is the step's end
        weights, grads = weight_and_grad_bytes(trainer.lightning_module, trainer.optimizers)
        metrics = {"model/weight_bytes": float(weights), "model/grad_bytes": float(grads)}
        age, then = self._launch
        if age is not None:
            metrics["time/since_launch_s"] = age + time.perf_counter() - then
        return metrics
