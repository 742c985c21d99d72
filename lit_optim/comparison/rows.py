"""One row of a comparison: a run's numbers, read from the metrics its monitors logged (`lit_optim.run_metrics`).

Which logged value each column takes (the monitors log per logging interval):

- final / min loss: the last and the lowest ``train/loss``; val loss: the last ``val/loss`` (the last validation,
  at the end of the fit when ``trainer.val_check_interval`` divides the steps; empty when the run does not validate);
- tokens/s, optimizer-step ms and its share of the training step: the last interval's ``throughput/tokens_per_sec``,
  ``timing/optimizer_step_ms``, ``timing/optimizer_step_share`` (after the warm-up steps: the steady state);
- first step s: ``timing/warmup/first_optimizer_step_ms`` / 1000 (torchao compiles here);
- launch to step 1 s: ``timing/launch_to_first_step_s`` (process start to the end of the first optimizer step);
- peak device, managed and host GiB: the highest ``memory/peak_allocated_bytes``, ``memory/managed_bytes`` (CUDA
  managed memory: bitsandbytes' paged state, outside PyTorch's allocator) and ``memory/host_peak_rss_bytes``;
- state bytes/param: the last ``optim_state/bytes_per_param``;
- fits the budget: the highest ``memory/peak_reserved_bytes`` (what an allocator cap counts) <= the budget; a run
  stopped out of memory (exit status 3) does not fit; a CPU run logs no device memory ("n/a").

Memory parts (the stacked bar of `lit_optim.comparison.plots`), in bytes:

- weights: ``model/weight_bytes`` (every parameter storage of the module, in its dtype);
- gradients: ``model/grad_bytes`` (one per trainable parameter in its dtype; 0 for optimizers that step in backward
  and free each gradient at once); both logged by `ComparisonRecorder`;
- optimizer state on the device: ``optim_state/bytes_gpu``; in managed memory: ``memory/managed_bytes`` (the
  optimizers' and bitsandbytes' paged buffers); on the host: ``optim_state/bytes_cpu`` + ``bytes_cpu_pinned``;
- the rest: the peak allocated minus weights, gradients and device state (activations, temporaries; at least 0).
On a CPU run the peak is the process's peak RSS (``memory/host_peak_rss_bytes``: everything lives on the host, Python
and the libraries included), the state there counts inside it and nothing is managed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lit_optim.run_metrics import RunMetrics

GIB = 2**30
OUT_OF_MEMORY_EXIT = 3  # lit_optim.errors.OutOfDeviceMemoryError.exit_code
# The memory parts outside the peak allocated (a GPU run's): stacked on top of it.
MANAGED, HOST = "optimizer state, managed (outside the peak)", "optimizer state, host (outside the peak)"


@dataclass
class Row:
    optimizer: str
    run_dir: Path
    exit_code: int
    reason: str | None = None
    seconds: float | None = None
    final_loss: float | None = None
    min_loss: float | None = None
    val_loss: float | None = None
    tokens_per_s: float | None = None
    opt_step_ms: float | None = None
    opt_step_share: float | None = None
    first_step_s: float | None = None
    launch_to_step1_s: float | None = None
    peak_device_gib: float | None = None
    peak_reserved_gib: float | None = None
    managed_gib: float | None = None
    host_gib: float | None = None
    state_bytes_per_param: float | None = None
    budget_gib: float | None = None
    memory_parts: dict[str, float] = field(default_factory=dict)  # bytes, see the module docstring
    memory_total_on: str = "device"  # "device" or "host (CPU run)": what the parts inside the peak add up to
    metrics: RunMetrics = field(default_factory=RunMetrics, repr=False)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def fits(self) -> str:
        """"yes" / "no" against `budget_gib`; "n/a" with no device-memory reading; "" with no budget or a run that
        stopped for another reason than memory."""
        if self.budget_gib is None:
            return ""
        if self.exit_code == OUT_OF_MEMORY_EXIT:
            return "no"
        if not self.ok:
            return ""  # stopped for another reason: unknown
        peak = self.peak_reserved_gib if self.peak_reserved_gib is not None else self.peak_device_gib
        if peak is None:
            return "n/a"
        return "yes" if peak <= self.budget_gib else "no"


def _div(value: float | None, scale: float) -> float | None:
    return None if value is None else value / scale


def memory_parts(m: RunMetrics) -> tuple[dict[str, float], str]:
    """Where the memory went (bytes), and what the inside parts add up to: see the module docstring."""
    device_peak = m.max("memory/peak_allocated_bytes")
    on_device = device_peak is not None
    total = device_peak if on_device else m.max("memory/host_peak_rss_bytes")
    if total is None:
        return {}, "device"
    weights = m.last("model/weight_bytes") or 0.0
    grads = m.last("model/grad_bytes") or 0.0
    host_state = (m.last("optim_state/bytes_cpu") or 0.0) + (m.last("optim_state/bytes_cpu_pinned") or 0.0)
    state_inside = (m.last("optim_state/bytes_gpu") or 0.0) if on_device else host_state
    parts = {
        "weights": weights,
        "gradients": grads,
        "optimizer state": state_inside,
        "rest": max(0.0, total - weights - grads - state_inside),
    }
    if on_device:
        parts[MANAGED] = m.max("memory/managed_bytes") or 0.0
        parts[HOST] = host_state
    return parts, "device" if on_device else "host (CPU run)"


def read_row(optimizer: str, run_dir: str | Path, exit_code: int, reason: str | None = None,
             seconds: float | None = None, budget_gib: float | None = None) -> Row:
    """A row from a run directory's metrics (whatever a failed run logged before it stopped)."""
    m = RunMetrics.find(run_dir)
    first_ms = m.last("timing/warmup/first_optimizer_step_ms")
    parts, total_on = memory_parts(m)
    return Row(
        optimizer=optimizer, run_dir=Path(run_dir), exit_code=exit_code, reason=reason, seconds=seconds,
        final_loss=m.last("train/loss"), min_loss=m.min("train/loss"), val_loss=m.last("val/loss"),
        tokens_per_s=m.last("throughput/tokens_per_sec"),
        opt_step_ms=m.last("timing/optimizer_step_ms"), opt_step_share=m.last("timing/optimizer_step_share"),
        first_step_s=_div(first_ms, 1000.0), launch_to_step1_s=m.last("timing/launch_to_first_step_s"),
        peak_device_gib=_div(m.max("memory/peak_allocated_bytes"), GIB),
        peak_reserved_gib=_div(m.max("memory/peak_reserved_bytes"), GIB),
        managed_gib=_div(m.max("memory/managed_bytes"), GIB), host_gib=_div(m.max("memory/host_peak_rss_bytes"), GIB),
        state_bytes_per_param=m.last("optim_state/bytes_per_param"), budget_gib=budget_gib,
        memory_parts=parts, memory_total_on=total_on, metrics=m,
    )
