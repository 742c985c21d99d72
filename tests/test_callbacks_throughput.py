"""SpeedMonitor: rates against the test's own clock, FLOPs against a count worked out by hand, MFU against the peak,
and the peak-FLOPs table under the names H100 and H200 drivers report."""

from __future__ import annotations

import time

import pytest
import torch
import yaml
from callbacks_support import BATCH, MODEL, SEQ, fit, read_csv, values
from lightning.fabric.utilities.throughput import _CUDA_FLOPS, Throughput
from lightning.pytorch import Callback
from torch import nn

from lit_optim.callbacks import SpeedMonitor
from lit_optim.flops import peak_flops_for_name, resolve_batch_flops, six_n_flops


def flops_per_sample(m=MODEL, t=SEQ) -> int:
    """Forward + backward FLOPs of one sequence of the tiny LM, by hand: 6 per weight of every matrix product per
    token, plus attention's two T x T products per layer (2 * T^2 * d each forward, backward twice the forward)."""
    d, layers, vocab = m["d_model"], m["n_layers"], m["vocab_size"]
    weights = layers * (d * 3 * d + d * d + d * 4 * d + 4 * d * d) + d * vocab
    return 6 * weights * t + layers * 3 * 2 * (2 * t * t * d)


class Clock(Callback):
    """The test's own timestamps at the end of each training batch (added after the monitor, so just after it)."""

    def __init__(self):
        self.t: list[float] = []

    def on_train_batch_end(self, *args):
        self.t.append(time.perf_counter())


def test_rates_flops_and_mfu(tmp_path):
    clock, peak = Clock(), 1e12
    trainer, module = fit(tmp_path, {"name": "adamw_torch", "lr": 1e-3}, 12,
                          [SpeedMonitor(log_every_n_steps=4, peak_flops=peak), clock], log_every_n_steps=4)
    rows = read_csv(trainer)
    samples = values(rows, "throughput/samples_per_sec")
    # The clock starts after the first step (warm-up); rates at the ends of the later intervals.
    assert [s for s, _ in samples] == [3, 7, 11]
    start = {3: 0, 7: 3, 11: 7}
    for step, rate in samples:
        n = step - start[step]
        # The monitor and the clock read the time in different hooks of the same step; on a busy 2-core machine the
        # gap between them has reached 9% of these short intervals, so the tolerance catches a wrong count, not noise.
        assert rate == pytest.approx(BATCH * n / (clock.t[step] - clock.t[start[step]]), rel=0.2)
    by_step = {int(r["step"]): r for r in rows if "throughput/samples_per_sec" in r}
    per_sample = flops_per_sample()
    for step, r in by_step.items():
        assert r["throughput/tokens_per_sec"] == pytest.approx(SEQ * r["throughput/samples_per_sec"])
        assert r["throughput/batches_per_sec"] * BATCH == pytest.approx(r["throughput/samples_per_sec"])
        assert r["throughput/flops_per_sec"] == pytest.approx(per_sample * r["throughput/samples_per_sec"])
        assert r["throughput/mfu"] == pytest.approx(r["throughput/flops_per_sec"] / peak)
        # One device: the all-rank figures are the device's.
        assert r["throughput/device/tokens_per_sec"] == r["throughput/tokens_per_sec"]
        assert r["throughput/device/mfu"] == r["throughput/mfu"]
        assert r["throughput/samples_seen"] == BATCH * (step + 1)
        assert r["throughput/tokens_seen"] == BATCH * SEQ * (step + 1)
    info = yaml.safe_load(open(f"{trainer.logger.log_dir}/hparams.yaml"))["throughput"]
    assert info["flops_source"] == "measured" and info["flops_per_batch"] == BATCH * per_sample
    assert info["peak_flops_per_device"] == peak and info["world_size"] == 1


def test_six_n_rule_and_module_attribute(tmp_path):
    trainer, module = fit(tmp_path, {"name": "sgd", "lr": 1e-2}, 6,
                          [SpeedMonitor(log_every_n_steps=2, measure_flops=False)], log_every_n_steps=2)
    n = sum(p.numel() for p in module.parameters())
    row = next(r for r in read_csv(trainer) if "throughput/flops_per_sec" in r)
    assert row["throughput/flops_per_sec"] == pytest.approx(6 * n * SEQ * row["throughput/samples_per_sec"])
    assert "throughput/mfu" not in row  # a CPU has no peak in the table
    assert yaml.safe_load(open(f"{trainer.logger.log_dir}/hparams.yaml"))["throughput"]["flops_source"] == "6N"

    class WithFlops(Callback):
        def on_fit_start(self, trainer, pl_module):
            pl_module.flops_per_batch = 1e9  # Lightning's ThroughputMonitor convention

    trainer, _ = fit(tmp_path / "attr", {"name": "sgd", "lr": 1e-2}, 6,
                     [WithFlops(), SpeedMonitor(log_every_n_steps=2)], log_every_n_steps=2)
    row = next(r for r in read_csv(trainer) if "throughput/flops_per_sec" in r)
    assert row["throughput/flops_per_sec"] == pytest.approx(1e9 * row["throughput/batches_per_sec"])


def test_meta_measurement_falls_back_to_six_n():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 16)

        def forward(self, x):
            if self.lin.weight.sum().item() > 1e9:  # needs real data: impossible on meta tensors
                return x
            return self.lin(x)

    model, warnings = DataDependent(), []
    flops, source = resolve_batch_flops(model, (torch.randn(4, 16),), {}, tokens=4, warn=warnings.append)
    assert (flops, source) == (six_n_flops(16 * 16 + 16, 4), "6N") and "6 * params * tokens" in warnings[0]
    flops, source = resolve_batch_flops(nn.Linear(16, 8, bias=False), (torch.randn(4, 16),), {}, tokens=None)
    # Forward and the weight's gradient (2 * rows * in * out each); the input needs no gradient.
    assert source == "measured" and flops == 2 * (2 * 4 * 16 * 8)


def test_all_rank_figures_scale_with_world_size():
    """Lightning's Throughput (as the monitor feeds it) sums over ranks: world size x this device's rate."""
    monitor = SpeedMonitor()
    tp = Throughput(available_flops=100.0, world_size=4, window_size=2)
    tp.update(time=1.0, batches=1, samples=8, lengths=256, flops=0)
    tp.update(time=3.0, batches=5, samples=40, lengths=1280, flops=4000)
    monitor._samples, monitor._tokens, monitor._has_tokens = 40, 1280, True
    m = monitor._metrics(tp.compute(), world_size=4)
    assert m["throughput/device/samples_per_sec"] == 16.0 and m["throughput/samples_per_sec"] == 64.0
    assert m["throughput/device/tokens_per_sec"] == 512.0 and m["throughput/tokens_per_sec"] == 2048.0
    assert m["throughput/device/flops_per_sec"] == 2000.0 and m["throughput/flops_per_sec"] == 8000.0
    assert m["throughput/mfu"] == m["throughput/device/mfu"] == 20.0
    assert m["throughput/tokens_seen"] == 4 * 1280


def test_peak_flops_table_knows_hopper_driver_names():
    bf16 = torch.bfloat16
    # The H100 SXM's driver name; Lightning maps it too, to the same dense figure.
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3", bf16) == 989.4e12 == _CUDA_FLOPS["h100 sxm"][bf16]
    # A plain "NVIDIA H200" is what these machines report; Lightning finds it only with "sxm1"/"nvl1" in the name,
    # and then gives the with-sparsity figure (2.0e15). The H200 SXM has the H100 SXM's tensor cores.
    assert peak_flops_for_name("NVIDIA H200", bf16) == 989.4e12 < _CUDA_FLOPS["h200 sxm1"][bf16]
    assert peak_flops_for_name("NVIDIA H200 NVL", bf16) == 835.5e12
    assert peak_flops_for_name("NVIDIA H100 PCIe", torch.float16) == 756e12
    assert peak_flops_for_name("NVIDIA H100 NVL", bf16) == 835.5e12
    assert peak_flops_for_name("NVIDIA GH200 480GB", bf16) == 989.4e12
    assert peak_flops_for_name("NVIDIA H200", torch.float8_e4m3fn) == 1978.9e12
    # float32 matmuls use TF32 unless the precision is "highest" (Lightning's rule).
    assert peak_flops_for_name("NVIDIA H200", torch.float32, "high") == 494.7e12
    assert peak_flops_for_name("NVIDIA H200", torch.float32, "highest") == 67e12
    assert peak_flops_for_name("NVIDIA A100-SXM4-80GB", bf16) is None  # not Hopper: Lightning's table decides


def test_ddp_two_cpu_processes_sum_over_ranks(tmp_path):
    """`lit-optim train` with Lightning's DDP on two CPU processes (gloo), validation in between: rank 0 logs per
    device and over both ranks; the other rank's monitors stay out of the way."""
    import csv
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "lit_optim.cli", "train", f"hydra.run.dir={run}", "trainer.accelerator=cpu",
           "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_steps=6", "trainer.log_every_n_steps=2",
           "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
           "callbacks.checkpoint=null", "logger=csv", "optim=adamw_torch", "model.d_model=64", "model.n_heads=2",
           f"data.seq_len={SEQ}", f"data.batch_size={BATCH}", "data.train_tokens=16384"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    log_dir = run / "csv" / "version_0"
    rows = [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(open(log_dir / "metrics.csv"))]
    rates = [r for r in rows if "throughput/samples_per_sec" in r]
    assert [int(r["step"]) for r in rates] == [1, 3, 5]
    for r in rates:
        assert r["throughput/samples_per_sec"] == pytest.approx(2 * r["throughput/device/samples_per_sec"])
        assert r["throughput/tokens_per_sec"] == pytest.approx(2 * r["throughput/device/tokens_per_sec"])
        assert r["throughput/samples_seen"] == 2 * BATCH * (r["step"] + 1)
    assert yaml.safe_load(open(log_dir / "hparams.yaml"))["throughput"]["world_size"] == 2
    assert any("optim_state/bytes" in r for r in rows) and any("timing/optimizer_step_ms" in r for r in rows)
