"""`OptimizerStateMonitor`: how many bytes the optimizer state really takes, where, in which dtypes, per group."""

from __future__ import annotations

from lit_optim.callbacks._common import SnapshotCallback, log_build_records, state_reports
from lit_optim.state_bytes import StateReport


class OptimizerStateMonitor(SnapshotCallback):
    """Logs the real storage bytes of optimizer state after the first optimizer step and every logging interval.

    Bytes are counted from storages, once each: torchao's quantized tensor subclasses by their inner tensors (codes,
    scales, maps), bitsandbytes' shared quantization maps once, paged buffers as managed memory, and wrapper
    optimizers through their inner optimizers (see `lit_optim.state_bytes`). The figures are rank 0's: under DDP every
    rank holds the same, under FSDP each its own shard. Also records what was built
    (``optimizer.lit_optim.record()``) in every logger's hyperparameters as ``optimizer_built``.

    Logged metrics:
        ``optim_state/bytes``: state bytes of this device (rank 0's).
        ``optim_state/bytes_per_param``: bytes / trainable parameters.
        ``optim_state/ratio_to_adamw_fp32``: bytes_per_param / 8 (AdamW's two fp32 moments).
        ``optim_state/trainable_params``, ``optim_state/trainable_tensors``: what the optimizer updates.
        ``optim_state/bytes_gpu``, ``optim_state/bytes_managed``, ``optim_state/bytes_cpu_pinned``,
        ``optim_state/bytes_cpu``: where the bytes live (managed: CUDA managed/paged memory).
        ``optim_state/bytes_dtype/<dtype>``: bytes by storage dtype (``uint8``, ``float32`` ...).
        ``optim_state/quantized_{params,tensors,bytes}``: parameters whose state is low-bit (int8/uint8/fp8 data).
        ``optim_state/full_precision_{params,tensors,bytes}``: parameters with 16/32-bit state (e.g. tensors too
        small or of the wrong size for quantization).
        ``optim_state/stateless_params``: parameters with no state (yet).
        ``optim_state/unattributed_bytes``: state not tied to one parameter (included in ``bytes``).
        ``optim_state/weight_correction_bytes``: bits the optimizer keeps to extend bf16/fp16 weights to higher
        precision (FlashOptim's error-correction bits for 24/32-bit master weights); included in ``bytes``, never
        counted as quantized state.
        ``optim_state/buffer_bytes`` (+ ``buffer_bytes_<where>``): memory the optimizer owns that is not state, e.g.
        CPU offloading's pinned host copies of parameters and gradients (not included in ``bytes``).
        ``optim_state/group/<group>/{bytes,params,bytes_per_param,quantized_params,full_precision_params}``: per
        param group (lit_optim's group names: ``decay``, ``no_decay`` ...).
    With several optimizers, the second logs under ``optim_state/1/...`` and so on.

    Args:
        log_every_n_steps: logging interval in optimizer steps; None follows ``Trainer(log_every_n_steps)``.
        log_build_record: record ``optimizer.lit_optim.record()`` in the loggers' hyperparameters.
    """

    def __init__(self, log_every_n_steps: int | None = None, log_build_record: bool = True) -> None:
        super().__init__(log_every_n_steps)
        self.log_build_record = log_build_record
        self.reports: list[StateReport] = []

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if self.log_build_record:
            log_build_records(trainer)

    def measure(self, trainer) -> dict[str, float]:
        self.reports = state_reports(trainer)
        metrics: dict[str, float] = {}
        for i, report in enumerate(self.reports):
            metrics.update(report.metrics("optim_state" if i == 0 else f"optim_state/{i}"))
        return metrics
