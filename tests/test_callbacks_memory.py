"""DeviceMemoryMonitor on a CPU: host memory against the kernel's own figure read at the same moment, and the
accounting of memory PyTorch's device allocator cannot see (managed and pinned). CUDA figures: test_callbacks_gpu.py."""

from __future__ import annotations

import resource

import pytest
import torch
from callbacks_support import fit, read_csv, values
from lightning.pytorch import Callback
from torch import nn

from lit_optim import build_optimizer
from lit_optim.callbacks import DeviceMemoryMonitor
from lit_optim.callbacks.device_memory import host_side_bytes
from lit_optim.state_bytes import state_report


def vm_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(row for row in f if row.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


class RssProbe(Callback):
    """Reads VmRSS right after the monitor (same hook, next callback)."""

    def __init__(self):
        self.rss: dict[int, int] = {}

    def on_train_batch_end(self, trainer, *args):
        self.rss[trainer.fit_loop.epoch_loop._batches_that_stepped] = vm_rss_bytes()


def test_host_memory_on_cpu(tmp_path):
    probe = RssProbe()
    trainer, _ = fit(tmp_path, {"name": "adamw_torch", "lr": 1e-3}, 6,
                     [DeviceMemoryMonitor(log_every_n_steps=3), probe], log_every_n_steps=3)
    rows = read_csv(trainer)
    rss = values(rows, "memory/host_rss_bytes")
    assert [s for s, _ in rss] == [0, 2, 5]  # after the first step, then every 3 steps
    for step, value in rss:
        assert value == pytest.approx(probe.rss[step], rel=0.02)
    peak = values(rows, "memory/host_peak_rss_bytes")[-1][1]
    assert peak >= max(v for _, v in rss) and peak == pytest.approx(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, rel=0.05)
    # No CUDA here: no device figures at all rather than zeros that look like measurements.
    assert not any(k.startswith("memory/") and "host" not in k for r in rows for k in r)


def test_managed_and_pinned_accounting_dedups_storages():
    model = nn.Linear(128, 128, bias=False)
    opt = build_optimizer(model, "paged_adamw_32bit", lr=1e-3)
    model(torch.randn(2, 128)).sum().backward()
    opt.step()
    state = opt.state[model.weight]
    state["state1"].is_paged = True  # as bitsandbytes tags its CUDA managed buffers (on a CPU it falls back)
    state["alias"] = state["state1"].view(-1)  # the same storage twice counts once
    got = host_side_bytes([state_report(opt)])
    assert got == {"managed": 128 * 128 * 4, "cpu_pinned": 0}
