"""The monitors in the Hydra `callbacks` group (on by default, each with its interval), with a TensorBoard logger, and
the overhead benchmark's toy-size run on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from callbacks_support import fit
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from lit_optim.callbacks import (
    DeviceMemoryMonitor,
    OptimizerStateMonitor,
    SpeedMonitor,
    StepTimingMonitor,
    WandbExtras,
    default_monitors,
)

ROOT = Path(__file__).resolve().parents[1]


def callbacks(tmp_path, *overrides):
    with initialize_config_module("lit_optim.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"output_dir={tmp_path}", *overrides])
    return {name: instantiate(node) for name, node in cfg.callbacks.items() if node}, cfg


def test_monitors_are_on_by_default_with_their_interval(tmp_path):
    built, cfg = callbacks(tmp_path, "callbacks.step_timing.warmup_steps=5",
                           "callbacks.throughput.log_every_n_steps=20")
    kinds = {name: type(cb) for name, cb in built.items()}
    assert kinds == {
        "checkpoint": kinds["checkpoint"], "lr_monitor": kinds["lr_monitor"], "optim_state": OptimizerStateMonitor,
        "throughput": SpeedMonitor, "step_timing": StepTimingMonitor, "device_memory": DeviceMemoryMonitor,
        "wandb_extras": WandbExtras,
    }
    assert built["optim_state"].log_every_n_steps is None  # follows trainer.log_every_n_steps
    assert built["throughput"].log_every_n_steps == 20 and built["step_timing"].warmup_steps == 5
    basic, _ = callbacks(tmp_path, "callbacks=basic")
    assert set(basic) == {"checkpoint", "lr_monitor"}
    dropped, _ = callbacks(tmp_path, "callbacks.device_memory=null")
    assert "device_memory" not in dropped and "optim_state" in dropped


def test_overhead_benchmark_runs_at_toy_size_on_cpu(tmp_path):
    out = tmp_path / "overhead.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "callback_overhead.py"), "--tiny", "--steps", "6",
                           "--warmup", "2", "--log-every", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(result["step_ms"]["on"]) == len(result["step_ms"]["off"]) == 1
    assert all(v > 0 for arm in result["step_ms"].values() for v in arm)
    assert result["overhead"] == result["median_step_ms"]["on"] / result["median_step_ms"]["off"] - 1
    readings = result["monitor_readings"]  # every monitor ran in the "on" arm
    for key in ("optim_state/bytes", "throughput/tokens_per_sec", "timing/optimizer_step_ms", "memory/host_rss_bytes"):
        assert readings[key] > 0, key
    assert "| off |" in proc.stdout and "| on  |" in proc.stdout


def test_all_monitors_with_tensorboard(tmp_path):
    """Any Lightning logger will do: the same figures land in TensorBoard's event file (read back with its reader)."""
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer, module = fit(tmp_path, {"name": "adamw_torch", "lr": 1e-3}, 4, default_monitors(), logger=logger,
                          log_every_n_steps=2)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("optim_state/bytes", "throughput/tokens_per_sec", "timing/optimizer_step_ms", "memory/host_rss_bytes"):
        assert tag in tags, tag
    params = sum(p.numel() for p in module.parameters())
    expected = 8 * params + 4 * len(list(module.parameters()))
    assert [e.value for e in events.Scalars("optim_state/bytes")] == [expected] * 3
