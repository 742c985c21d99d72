"""The monitors on a CUDA GPU: state bytes against the caching allocator, paged state as managed memory, MFU, no host
synchronisation between logging steps, and torchao's CPU offloading. Skipped without a GPU; run with

    python -m pytest -m gpu tests/
"""

from __future__ import annotations

import pytest
import torch
import yaml
from callbacks_support import SEQ, fit, read_csv, values
from lightning.pytorch import Callback
from torch import nn

from lit_optim.callbacks import DeviceMemoryMonitor, OptimizerStateMonitor, SpeedMonitor, StepTimingMonitor, WandbExtras
from lit_optim.flops import available_flops, peak_flops_for_name
from lit_optim.state_bytes import state_report

pytestmark = pytest.mark.gpu

# ~17M parameters, with matrices of >= 1e5 elements, which bitsandbytes' paged optimizers put in managed memory.
GPU_MODEL = {"arch": "tiny", "vocab_size": 4096, "d_model": 512, "n_layers": 4, "n_heads": 8, "max_seq_len": 64}
# ~134M parameters: the caching allocator hands out whole cached blocks when less than 1 MiB would be left over, so
# memory_allocated runs up to ~1 MiB per allocation above the bytes requested; this keeps that slack under 1%.
BIG_MODEL = {"arch": "tiny", "vocab_size": 8192, "d_model": 2048, "n_layers": 2, "n_heads": 16, "max_seq_len": 64}


def _allocator() -> tuple[int, int]:
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated(), torch.cuda.memory_stats()["requested_bytes.all.current"]


class AllocProbe(Callback):
    """The caching allocator around the first optimizer update: after backward, and at the batch's end."""

    def __init__(self):
        self.before = self.after = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0:
            self.before = _allocator()

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 1 and self.after is None:
            self.after = _allocator()

    @property
    def delta(self) -> int:
        """Growth of torch.cuda.memory_allocated (block sizes)."""
        return self.after[0] - self.before[0]

    @property
    def requested_delta(self) -> int:
        """Growth of the bytes requested (before the allocator's rounding)."""
        return self.after[1] - self.before[1]


@pytest.mark.parametrize("name", ["adamw_torch", "adamw_torch_fused", "adamw_torch_8bit", "adamw_torch_4bit",
                                  "adamw_bnb_8bit"])
def test_gpu_state_bytes_match_allocator_delta(tmp_path, name):
    probe = AllocProbe()
    trainer, module = fit(tmp_path, {"name": name, "lr": 1e-4}, 2, [OptimizerStateMonitor(), probe],
                          accelerator="gpu", model=BIG_MODEL)
    first = next(r for r in read_csv(trainer) if "optim_state/bytes" in r)
    assert first["step"] == 0
    assert first["optim_state/bytes_gpu"] == pytest.approx(probe.delta, rel=0.01)
    assert first["optim_state/bytes_gpu"] == pytest.approx(probe.requested_delta, rel=1e-4)
    assert first["optim_state/bytes_gpu"] > 0.9 * first["optim_state/bytes"]  # at most step counters elsewhere
    assert first["optim_state/bytes_managed"] == first["optim_state/bytes_cpu_pinned"] == 0


def test_paged_state_is_reported_as_managed_memory(tmp_path):
    probe = AllocProbe()
    trainer, module = fit(tmp_path, {"name": "paged_adamw_8bit", "lr": 1e-4}, 2,
                          [OptimizerStateMonitor(), DeviceMemoryMonitor(), probe], accelerator="gpu", model=GPU_MODEL)
    opt = trainer.optimizers[0]
    paged = sum(t.untyped_storage().nbytes() for s in opt.state.values() for t in s.values()
                if isinstance(t, torch.Tensor) and getattr(t, "is_paged", False))
    assert paged > 0
    rows = read_csv(trainer)
    first = next(r for r in rows if "optim_state/bytes" in r)
    assert first["optim_state/bytes_managed"] == paged
    # The caching allocator sees only the rest (tensors under 1e5 elements, quantization maps, absmax scales).
    assert first["optim_state/bytes_gpu"] == pytest.approx(probe.requested_delta, rel=1e-4)
    assert probe.delta < 0.2 * paged
    memory = next(r for r in rows if "memory/managed_bytes" in r)
    assert memory["memory/managed_bytes"] >= paged  # bitsandbytes' page manager: this run's buffers at least


def test_mfu_and_tokens_per_sec(tmp_path):
    trainer, module = fit(tmp_path, {"name": "adamw_torch_fused", "lr": 1e-4}, 12, [SpeedMonitor(log_every_n_steps=4)],
                          accelerator="gpu", model=GPU_MODEL, precision="bf16-mixed", log_every_n_steps=4)
    name = torch.cuda.get_device_name()
    peak = available_flops(torch.device("cuda"), torch.bfloat16)
    assert peak, f"no peak FLOP/s known for {name!r}"
    if name in ("NVIDIA H100 80GB HBM3", "NVIDIA H200"):
        assert peak == peak_flops_for_name(name, torch.bfloat16) == 989.4e12
    info = yaml.safe_load(open(f"{trainer.logger.log_dir}/hparams.yaml"))["throughput"]
    assert info["peak_flops_per_device"] == peak and info["device"] == name and info["dtype"] == "bfloat16"
    rows = [r for r in read_csv(trainer) if "throughput/mfu" in r]
    assert len(rows) == 3
    for r in rows:
        assert 0 < r["throughput/mfu"] < 1
        assert r["throughput/mfu"] == pytest.approx(r["throughput/device/flops_per_sec"] / peak)
        assert r["throughput/tokens_per_sec"] == pytest.approx(SEQ * r["throughput/samples_per_sec"])
        assert r["throughput/tokens_per_sec"] > 0


def test_no_host_sync_between_logging_steps(tmp_path, monkeypatch):
    calls = {"synchronize": 0, "event": 0}
    device_sync, event_sync = torch.cuda.synchronize, torch.cuda.Event.synchronize

    def counted_sync(*args, **kwargs):
        calls["synchronize"] += 1
        return device_sync(*args, **kwargs)

    def counted_event_sync(self):
        calls["event"] += 1
        return event_sync(self)

    monkeypatch.setattr(torch.cuda, "synchronize", counted_sync)
    monkeypatch.setattr(torch.cuda.Event, "synchronize", counted_event_sync)

    class PerBatch(Callback):  # runs after the monitors
        def __init__(self):
            self.syncs: list[int] = []

        def on_train_batch_end(self, trainer, *args):
            self.syncs.append(calls["synchronize"] + calls["event"])

    per_batch = PerBatch()
    monitors = [OptimizerStateMonitor(5), SpeedMonitor(5), StepTimingMonitor(5, warmup_steps=3),
                DeviceMemoryMonitor(5), WandbExtras()]
    trainer, _ = fit(tmp_path, {"name": "adamw_torch_fused", "lr": 1e-4}, 20, [*monitors, per_batch],
                     accelerator="gpu", model=GPU_MODEL, log_every_n_steps=5)
    synced = [i for i, (a, b) in enumerate(zip([0, *per_batch.syncs], per_batch.syncs)) if b > a]
    # Batch 0: the throughput clock starts; batch 2: the timing warm-up is read; batches 4, 9, 14, 19: logging.
    assert synced == [0, 2, 4, 9, 14, 19]
    timing = values(read_csv(trainer), "timing/optimizer_step_ms")
    assert [s for s, _ in timing] == [4, 9, 14, 19] and all(v > 0 for _, v in timing)


def test_cpu_offload_optimizer_accounting():
    from torchao.optim import CPUOffloadOptimizer

    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 16)).cuda()
    opt = CPUOffloadOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)  # fused AdamW on the CPU
    model(torch.randn(8, 1024, device="cuda")).sum().backward()
    opt.step()
    torch.cuda.synchronize()
    big = 1024 * 1024 + 16 * 1024  # >= 4096 elements: offloaded, stepped on the CPU
    small = 1024 + 16  # biases: stepped on the GPU by the on-device optimizer
    report = state_report(opt)
    assert report.total.params == big + small and report.total.tensors == 4
    assert report.total.by_location["cpu"] == 2 * 4 * big + 2 * 4  # two fp32 moments + a step counter per tensor
    assert report.total.by_location["gpu"] == 2 * 4 * small + 2 * 4
    # Pinned host copies of the offloaded parameters and their gradients: buffers, not state.
    assert report.buffer_by_location["cpu_pinned"] == 2 * 4 * big and report.buffer_bytes == 2 * 4 * big
