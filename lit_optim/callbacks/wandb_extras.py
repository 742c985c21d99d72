"""`WandbExtras`: what only W&B can show -- metric summaries, the built optimizer in the run config, a state table.

Inert without a `WandbLogger`; never imports wandb itself (the logger does, when it starts its run), and any W&B
failure becomes a warning: monitoring must never stop training.
"""

from __future__ import annotations

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from lit_optim.callbacks._common import build_records, state_reports

# namespace glob -> summary W&B keeps for it
SUMMARIES = {
    "optim_state/*": "max",
    "memory/*": "max",
    "throughput/*": "mean",
    "timing/*": "mean",
}
TABLE_KEY = "optim_state_table"


def wandb_loggers(trainer) -> list:
    from lightning.pytorch.loggers import WandbLogger

    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


class WandbExtras(Callback):
    """W&B-only additions to the monitors (which themselves work with any Lightning logger).

    At the start of training: ``define_metric`` for each namespace with the summary W&B keeps -- ``max`` for
    ``optim_state/*`` and ``memory/*``, ``mean`` for ``throughput/*`` and ``timing/*`` -- stepped by
    ``trainer/global_step`` like Lightning's metrics; and the run config's ``optimizer_built``: what was actually built
    (``optimizer.lit_optim.record()``: class, backend, bits, paged, block size, groups and parameter counts).

    Logged metrics:
        ``optim_state_table``: at the end of training, a W&B Table of the optimizer state per param group (and a row
        ``all``): tensors, params, state bytes, bytes per param, ratio to fp32 AdamW, quantized / full-precision /
        stateless counts and bytes, bytes by location (gpu, managed, cpu_pinned, cpu) and by dtype. With several
        optimizers, ``optim_state_table/<i>`` for the second and further ones.

    Args:
        summaries: namespace glob -> W&B summary (``"max"``, ``"mean"``, ``"min"``, ``"last"``); default `SUMMARIES`.
        table: log the state table at the end of training.
    """

    def __init__(self, summaries: dict[str, str] | None = None, table: bool = True) -> None:
        super().__init__()
        self.summaries = dict(SUMMARIES if summaries is None else summaries)
        self.table = table
        self._warned = False

    def _warn(self, what: str, err: Exception) -> None:
        if not self._warned:
            rank_zero_warn(f"lit_optim: W&B {what} failed ({type(err).__name__}: {err}); training goes on without it.")
            self._warned = True

    @rank_zero_only
    def on_train_start(self, trainer, pl_module) -> None:
        records = build_records(trainer)
        for logger in wandb_loggers(trainer):
            try:
                run = logger.experiment
                for glob, summary in self.summaries.items():
                    run.define_metric(glob, summary=summary, step_metric="trainer/global_step", step_sync=True)
                if records:
                    run.config.update(records, allow_val_change=True)
            except Exception as err:  # noqa: BLE001 - W&B must never stop training
                self._warn("setup", err)

    @rank_zero_only
    def on_train_end(self, trainer, pl_module) -> None:
        loggers = wandb_loggers(trainer)
        if not (self.table and loggers):
            return
        try:
            tables = [report.table() for report in state_reports(trainer)]
        except Exception as err:  # noqa: BLE001
            self._warn("state table", err)
            return
        for logger in loggers:
            for i, (columns, rows) in enumerate(tables):
                try:
                    logger.log_table(TABLE_KEY + (f"/{i}" if i else ""), columns=columns, data=rows,
                                     step=trainer.global_step)
                except Exception as err:  # noqa: BLE001
                    self._warn("table", err)
