"""`DeviceMemoryMonitor`: peak GPU memory per logging interval, the memory PyTorch's allocator cannot see, headroom."""

from __future__ import annotations

import os
import resource
import sys

import torch

from lit_optim.callbacks._common import SnapshotCallback, state_reports
from lit_optim.state_bytes import StateReport


def bnb_paged_tensors() -> list[torch.Tensor]:
    """Every paged (CUDA managed) buffer bitsandbytes has made in this process (none if it was never imported)."""
    if "bitsandbytes" not in sys.modules:
        return []
    try:
        from bitsandbytes.functional import GlobalPageManager

        return list(GlobalPageManager.get_instance().paged_tensors)
    except Exception:  # noqa: BLE001 - older or newer bitsandbytes without the page manager
        return []


def host_side_bytes(reports: list[StateReport]) -> dict[str, int]:
    """Managed (paged) and pinned host bytes held by the optimizers (`state_report`s: state and buffers) and by
    bitsandbytes' page manager, each storage once."""
    out = {}
    for where in ("managed", "cpu_pinned"):
        out[where] = sum(r.total.by_location.get(where, 0) + r.buffer_by_location.get(where, 0) for r in reports)
    seen = set().union(*(r.host_storages["managed"] for r in reports))
    for t in bnb_paged_tensors():
        key = (t.is_cuda, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            out["managed"] += t.untyped_storage().nbytes()
    return out


def host_rss_bytes() -> int | None:
    """Resident set size of this process (Linux: /proc/self/statm), or None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class DeviceMemoryMonitor(SnapshotCallback):
    """Logs device memory after the first optimizer step and every logging interval.

    Peaks are PyTorch's caching-allocator peaks since the last logging point (the monitor resets them after reading,
    unless ``reset_peak=False``). CUDA managed memory (bitsandbytes' paged optimizer state) and pinned host memory are
    outside that allocator: the monitor counts them from the optimizers' storages and bitsandbytes' page manager.
    Reading these numbers needs no device synchronisation.

    Logged metrics (CUDA):
        ``memory/allocated_bytes``, ``memory/reserved_bytes``: now.
        ``memory/peak_allocated_bytes``, ``memory/peak_reserved_bytes``: highest in the interval.
        ``memory/capacity_bytes``: the device's total memory; ``memory/free_bytes``: what the driver reports free
        (other processes and managed pages count against it).
        ``memory/headroom_bytes``: capacity - peak reserved; ``memory/headroom_fraction``: the same / capacity.
        ``memory/managed_bytes``: CUDA managed (paged) memory held by the optimizers and bitsandbytes.
        ``memory/optimizer_pinned_bytes``: pinned host memory held by the optimizers (state and buffers).
        ``memory/pinned_host_bytes``: pinned host memory held by PyTorch's host allocator (loaders, offloading).
    Always:
        ``memory/host_rss_bytes``: this process's resident memory; ``memory/host_peak_rss_bytes``: its peak so far.

    Args:
        log_every_n_steps: logging interval in optimizer steps; None follows ``Trainer(log_every_n_steps)``.
        reset_peak: reset the allocator's peak statistics after each reading (peaks per interval).
    """

    def __init__(self, log_every_n_steps: int | None = None, reset_peak: bool = True) -> None:
        super().__init__(log_every_n_steps)
        self.reset_peak = reset_peak

    def measure(self, trainer) -> dict[str, float]:
        metrics: dict[str, float] = {}
        device = trainer.strategy.root_device
        if device.type == "cuda":
            reserved_peak = torch.cuda.max_memory_reserved(device)
            free, total = torch.cuda.mem_get_info(device)
            metrics.update({
                "memory/allocated_bytes": torch.cuda.memory_allocated(device),
                "memory/reserved_bytes": torch.cuda.memory_reserved(device),
                "memory/peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
                "memory/peak_reserved_bytes": reserved_peak,
                "memory/capacity_bytes": total,
                "memory/free_bytes": free,
                "memory/headroom_bytes": total - reserved_peak,
                "memory/headroom_fraction": (total - reserved_peak) / total if total else 0.0,
            })
            if self.reset_peak:
                torch.cuda.reset_peak_memory_stats(device)
            host = host_side_bytes(state_reports(trainer))
            metrics["memory/managed_bytes"] = host["managed"]
            metrics["memory/optimizer_pinned_bytes"] = host["cpu_pinned"]
            try:
                stats = torch.cuda.host_memory_stats()
                metrics["memory/pinned_host_bytes"] = stats.get("allocated_bytes.current",
                                                                stats.get("allocated_bytes.all.current", 0))
            except (AttributeError, RuntimeError):
                pass
        rss = host_rss_bytes()
        if rss is not None:
            metrics["memory/host_rss_bytes"] = rss
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        metrics["memory/host_peak_rss_bytes"] = max(peak, rss or 0)  # the kernel updates its high-water mark lazily
        return metrics
