"""W&B: `lit-optim train` with the W&B logger offline, proved by reading the offline run's own log file; the reader
itself on real wandb output; and training that goes on when wandb is not installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from callbacks_support import storage_bytes
from omegaconf import OmegaConf

from lit_optim import build_optimizer
from lit_optim.task.module import LanguageModelTask
from lit_optim.wandb_offline import BLOCK_SIZE, CorruptLogError, OfflineRun, iter_payloads

CONF = Path(__file__).resolve().parents[1] / "conf"
SMALLER = {"d_model": 64, "n_heads": 2}  # the tiny config, narrower: quick on two CPU cores
TRAIN_ARGS = [
    "trainer.max_steps=6", "trainer.log_every_n_steps=2", "trainer.val_check_interval=3",
    "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false", "data.train_tokens=16384",
    "data.seq_len=32", "data.batch_size=8", "callbacks.checkpoint=null",
    *(f"model.{k}={v}" for k, v in SMALLER.items()),
]


def lit_optim_train(run_dir: Path, *overrides: str, python_prelude: str = "") -> subprocess.CompletedProcess:
    code = python_prelude + "import sys; from lit_optim.cli import main; sys.exit(main())"
    cmd = [sys.executable, "-c", code, "train", f"hydra.run.dir={run_dir}", *TRAIN_ARGS, *overrides]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=run_dir.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def expected_state(optim: str) -> tuple[int, int, dict]:
    """State bytes and quantized parameters of the configured model after one step, computed here on its own."""
    model_cfg = {**OmegaConf.to_container(OmegaConf.load(CONF / "model" / "tiny.yaml")), **SMALLER}
    module = LanguageModelTask(model=model_cfg, optim=optim)
    module.configure_model()
    opt = build_optimizer(module, optim, lr=1e-3)
    module(torch.randint(0, model_cfg["vocab_size"], (2, 8))).sum().backward()
    opt.step()
    quantized = sum(p.numel() for p in module.parameters()
                    if any(isinstance(v, torch.Tensor) and v.dtype == torch.uint8 for v in opt.state[p].values()))
    return storage_bytes(opt), quantized, opt.lit_optim.record()


def test_train_with_wandb_offline_records_metrics_config_and_table(tmp_path):
    run_dir = tmp_path / "run"
    lit_optim_train(run_dir, "optim=adamw_bnb_8bit", "logger=wandb")
    run = OfflineRun.find(run_dir / "wandb")
    assert run.record_types.get("exit") == 1  # the run was closed properly
    total, quantized, record = expected_state("adamw_bnb_8bit")

    # Metrics, in every namespace.
    state_bytes = run.history_values("optim_state/bytes")
    assert len(state_bytes) == 4 and set(state_bytes) == {total}  # after step 1, then steps 2, 4, 6
    assert run.history_values("optim_state/quantized_params")[-1] == quantized > 0
    assert run.history_values("optim_state/bytes_per_param")[-1] == pytest.approx(total / record["trainable_params"])
    for row in (r for r in run.history if "throughput/tokens_per_sec" in r):
        assert row["throughput/tokens_per_sec"] == pytest.approx(32 * row["throughput/samples_per_sec"])
        assert row["throughput/flops_per_sec"] > 0
    assert run.history_values("throughput/tokens_per_sec")
    assert all(v > 0 for v in run.history_values("timing/optimizer_step_ms"))
    assert run.history_values("timing/warmup/first_optimizer_step_ms")
    assert all(v > 0 for v in run.history_values("memory/host_rss_bytes"))
    steps = [r["trainer/global_step"] for r in run.history if "optim_state/bytes" in r]
    assert steps == [0, 1, 3, 5]  # Lightning's logging steps, the x-axis W&B plots against

    # define_metric: each namespace with its summary, against trainer/global_step.
    summaries = {m["glob_name"]: (m["summary"], m["step_metric"]) for m in run.metrics if m["glob_name"]}
    expected = {"optim_state/*": "max", "memory/*": "max", "throughput/*": "mean", "timing/*": "mean"}
    for glob, summary in expected.items():
        assert summaries[glob] == ([summary], "trainer/global_step")

    # The config holds what was built, not only what was asked.
    built = run.config["optimizer_built"]
    assert built["class"] == "bitsandbytes.optim.AdamW8bit" == record["class"]
    assert (built["bits"], built["paged"], built["backend"]) == (8, False, "bitsandbytes")
    assert built["groups"] == [{**g, "weight_decay": g["weight_decay"]} for g in record["groups"]]
    assert built["trainable_params"] == record["trainable_params"]
    assert built["embedding_32bit_params"] == record["embedding_32bit_params"] > 0
    assert run.config["optim"]["name"] == "adamw_bnb_8bit"  # what was asked, recorded by lit-optim train
    assert run.config["throughput"]["flops_source"] == "measured"

    # The table: one row per param group and a total.
    table = run.table("optim_state_table")
    rows = {r[0]: dict(zip(table["columns"], r)) for r in table["data"]}
    assert list(rows) == ["decay", "no_decay", "all"]
    assert rows["all"]["state_bytes"] == total == rows["decay"]["state_bytes"] + rows["no_decay"]["state_bytes"]
    assert rows["all"]["quantized_params"] == quantized and rows["all"]["bytes_cpu"] == total
    assert rows["all"]["params"] == record["trainable_params"]


def test_training_goes_on_without_wandb_installed(tmp_path):
    """As on the GPU machines: no wandb at all. logger=wandb falls back to CSV; every monitor still logs."""
    hide = (
        "import sys\n"
        "class Hide:\n"
        "    def __init__(self, inner): self.inner = inner\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        return None if name.split('.')[0] == 'wandb' else self.inner.find_spec(name, path, target)\n"
        "    def __getattr__(self, attr): return getattr(self.inner, attr)\n"
        "sys.meta_path[:] = [Hide(f) if hasattr(f, 'find_spec') else f for f in sys.meta_path]\n"
        "import atexit; atexit.register(lambda: print('WANDB_IMPORTED' if 'wandb' in sys.modules else 'NO_WANDB'))\n"
    )
    run_dir = tmp_path / "run"
    proc = lit_optim_train(run_dir, "optim=adamw_torch", "logger=wandb", "trainer.max_steps=4", "validate=false",
                           python_prelude=hide)
    assert "NO_WANDB" in proc.stdout
    assert "wandb is not installed" in proc.stderr
    metrics = (run_dir / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("optim_state/bytes", "throughput/tokens_per_sec", "timing/optimizer_step_ms", "memory/host_rss_bytes"):
        assert key in metrics


def test_reader_joins_fragments_across_blocks_and_checks_crcs(tmp_path):
    import wandb

    big = "x" * (3 * BLOCK_SIZE)  # one record spanning several 32 KiB blocks: FIRST, MIDDLE..., LAST
    run = wandb.init(project="reader", dir=str(tmp_path), mode="offline", config={"big": big, "n": 1})
    for i in range(300):
        run.log({"loss": 1.0 / (i + 1), "note": f"row {i}"})
    run.finish()
    path = next(tmp_path.rglob("run-*.wandb"))
    # W&B's writer is a separate service process; when earlier tests of this process have used it, the tail of the
    # log can land shortly after finish() returns (seen in the full suite): read once the file has stopped growing.
    import time

    deadline, size = time.monotonic() + 20, -1
    while time.monotonic() < deadline and path.stat().st_size != size:
        size = path.stat().st_size
        time.sleep(0.5)
    assert path.stat().st_size > 4 * BLOCK_SIZE
    read = OfflineRun.read(path)
    assert read.config["big"] == big and read.config["n"] == 1
    assert read.history_values("loss") == [1.0 / (i + 1) for i in range(300)]
    assert read.history_values("_step") == list(range(300))

    data = bytearray(path.read_bytes())
    data[BLOCK_SIZE + 100] ^= 0xFF  # flip a byte inside the second block
    broken = tmp_path / "broken.wandb"
    broken.write_bytes(bytes(data))
    with pytest.raises(CorruptLogError):
        list(iter_payloads(broken))
    broken.write_bytes(b"not a wandb log")
    with pytest.raises(CorruptLogError):
        list(iter_payloads(broken))
