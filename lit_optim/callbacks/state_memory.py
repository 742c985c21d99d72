"""`OptimizerStateMonitor`: how many bytes the optimizer state really takes, where, in which dtypes, per group."""

from __future__ import annotations

import torch

from lit_optim.callbacks._common import SnapshotCallback, log_build_records, state_reports
from lit_optim.state_bytes import StateReport


class OptimizerStateMonitor(SnapshotCallback):
    """Logs the real storage bytes of optimizer state after the first optimizer step and every logging interval.

    Bytes are counted from storages, once each: torchao's quantized tensor subclasses by their inner tensors (codes,
    scales, maps), bitsandbytes' shared quantization maps once, paged buffers as managed memory, and wrapper
    optimizers through their inner optimizers (see `lit_optim.state_bytes`). The per-device figures are rank 0's
    (under DDP every rank holds the same, under FSDP2 each its own shard, and parameters count its shard's
    elements); with several processes every rank measures and the totals over ranks are logged too. Also records
    what was built (``optimizer.lit_optim.record()``) in every logger's hyperparameters as ``optimizer_built``.

    Logged metrics:
        ``optim_state/bytes``: state bytes of this device (rank 0's).
        ``optim_state/bytes_per_param``: bytes / trainable parameters (of this rank's shards under FSDP2).
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
        ``optim_state/all_ranks/{bytes,trainable_params,quantized_params,bytes_gpu,bytes_cpu}``: sums over the ranks
        (with more than one process): what the whole job holds. ``optim_state/max_rank/bytes``: the largest rank's
        bytes (what must fit on one device). ``optim_state/ranks``: the number of processes.
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

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.world_size <= 1:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # Every rank measures at the same steps (the condition depends only on the global step), so the gather
        # below is entered by all of them; rank 0 logs.
        first = not self._first_logged and trainer.global_step >= 1
        if first or self.is_log_step(trainer):
            self._first_logged = True
            metrics = self.measure(trainer)
            metrics.update(self._over_ranks(trainer, metrics))
            if trainer.is_global_zero:
                self.publish(trainer, metrics)

    _SUMMED = ("bytes", "trainable_params", "quantized_params", "bytes_gpu", "bytes_cpu")

    def _over_ranks(self, trainer, metrics: dict[str, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        for i in range(len(self.reports)):
            prefix = "optim_state" if i == 0 else f"optim_state/{i}"
            mine = torch.tensor([float(metrics.get(f"{prefix}/{k}", 0.0)) for k in self._SUMMED],
                                dtype=torch.float64, device=trainer.strategy.root_device)
            ranks = trainer.strategy.all_gather(mine).reshape(-1, len(self._SUMMED)).cpu()
            for j, key in enumerate(self._SUMMED):
                out[f"{prefix}/all_ranks/{key}"] = float(ranks[:, j].sum())
            out[f"{prefix}/max_rank/bytes"] = float(ranks[:, 0].max())
            out[f"{prefix}/ranks"] = float(ranks.shape[0])
        return out

    def measure(self, trainer) -> dict[str, float]:
        self.reports = state_reports(trainer)
        metrics: dict[str, float] = {}
        for i, report in enumerate(self.reports):
            metrics.update(report.metrics("optim_state" if i == 0 else f"optim_state/{i}"))
        return metrics
