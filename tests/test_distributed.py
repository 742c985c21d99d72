"""Distributed training through Lightning's own DDP (two CPU processes, gloo): an 8-bit optimizer trains, and a
run resumed from a mid-epoch checkpoint ends with exactly the parameters and optimizer state of a straight run."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from harness import _flatten_state  # noqa: F401  (kept for symmetry with single-device tests)

ARGS = [
    "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_steps=8",
    "trainer.val_check_interval=4", "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false",
    "callbacks.checkpoint.every_n_train_steps=4", "callbacks.lr_monitor=null", "logger=csv",
    "model.d_model=64", "model.n_heads=2", "data.seq_len=32", "data.batch_size=8", "data.train_tokens=16384",
]

def _train(run_dir, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "lit_optim.cli", "train", f"hydra.run.dir={run_dir}", *ARGS, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=run_dir.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc

def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)

def test_ddp_trains_and_resumes_exactly(tmp_path):
    straight = tmp_path / "straight"
    _train(straight, "optim=adamw_8bit")
    mid = straight / "checkpoints" / "epoch=0-step=4.ckpt"
    assert mid.exists(), list((straight / "checkpoints").iterdir())
    resumed = tmp_path / "resumed"
    _train(resumed, "optim=adamw_8bit", f"ckpt_path='{mid}'")

    a, b = _load(straight / "checkpoints" / "last.ckpt"), _load(resumed / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 8
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys() and sa
    for idx in sa:
        for key, value in sa[idx].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, sb[idx][key]), (idx, key)
    first = _load(mid)
    moved = [k for k, v in a["state_dict"].items() if not torch.equal(v, first["state_dict"][k])]
    assert moved, "parameters did not change between step 4 and step 8"


def test_ddp_with_offload_matches_ddp_without(tmp_path):
    """Level-1 offload steps on the gradients DDP has already reduced: the same parameters as plain DDP, bit for bit."""
    plain, offloaded = tmp_path / "plain", tmp_path / "offloaded"
    _train(plain, "optim=adamw_torch", "trainer.max_steps=4")
    _train(offloaded, "optim=adamw_torch", "optim.offload=cpu", "trainer.max_steps=4")
    a, b = _load(plain / "checkpoints" / "last.ckpt"), _load(offloaded / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 4
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    # The state monitor gathers every rank's figures: under DDP each of the 2 ranks holds a full copy.
    from lit_optim.run_metrics import RunMetrics

    for run, where in ((plain, "bytes_cpu"), (offloaded, "bytes_cpu")):
        m = RunMetrics.find(run)
        one, total = m.last("optim_state/bytes"), m.last("optim_state/all_ranks/bytes")
        assert one and total == 2 * one and m.last("optim_state/ranks") == 2, (run.name, one, total)
        assert m.last("optim_state/max_rank/bytes") == one
        assert m.last(f"optim_state/all_ranks/{where}") == 2 * m.last(f"optim_state/{where}")
        assert m.last("optim_state/all_ranks/trainable_params") == 2 * m.last("optim_state/trainable_params")
