"""Distributed training through Lightning's own DDP (two CPU processes, gloo): an 8-bit optimizer trains, and a
run resumed from a mid-epoch checkpoint ends with exactly the parameters and optimizer state of a straight run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
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


@pytest.mark.slow
def test_fsdp2_through_the_cli_shards_and_resumes_exactly_from_a_sharded_checkpoint(tmp_path):
    """`trainer=fsdp2`: the built-in task shards itself over both ranks, checkpoints are DCP directories, and
    `ckpt_path=<directory>` resumes to exactly the straight run's weights and fused 8-bit codes."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from lit_optim.run_metrics import RunMetrics

    args = [a for a in ARGS if not a.startswith("trainer.strategy=")]
    fsdp2 = ["trainer=fsdp2", "trainer.precision=32-true", "optim=adamw_fused_8bit"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def train(run_dir, *extra):
        cmd = [sys.executable, "-m", "lit_optim.cli", "train", f"hydra.run.dir={run_dir}", *fsdp2, *args, *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=run_dir.parent)
        assert proc.returncode == 0, proc.stderr[-3000:]

    train(straight)
    mid = straight / "checkpoints" / "epoch=0-step=4.ckpt"
    assert mid.is_dir() and (mid / ".metadata").is_file(), list((straight / "checkpoints").iterdir())
    train(resumed, f"ckpt_path='{mid}'")
    flat = {}
    for run in (straight, resumed):
        dcp_to_torch_save(run / "checkpoints" / "last.ckpt", tmp_path / f"{run.name}.pt")
        flat[run.name] = torch.load(tmp_path / f"{run.name}.pt", weights_only=False)
    a, b = flat["straight"], flat["resumed"]
    # Lightning keeps the loop state (global step ...) beside the shards, in meta.pt.
    meta = [torch.load(run / "checkpoints" / "last.ckpt" / "meta.pt", weights_only=False)
            for run in (straight, resumed)]
    assert meta[0]["global_step"] == meta[1]["global_step"] == 8
    assert a["state_dict"].keys() == b["state_dict"].keys() and a["state_dict"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    codes = [k for k in _walk(a) if k.endswith("exp_avg") or k.endswith("exp_avg_sq")]
    assert codes, sorted(_walk(a))[:20]
    for key in codes:
        assert torch.equal(_walk(a)[key], _walk(b)[key]), key
    # Sharded over both ranks: each holds half the codes; the monitor's total over ranks is twice rank 0's.
    m = RunMetrics.find(straight)
    assert m.last("optim_state/ranks") == 2
    assert m.last("optim_state/all_ranks/trainable_params") > m.last("optim_state/trainable_params")


def _walk(tree, prefix=""):
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_walk(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(tree, torch.Tensor):
        out[prefix] = tree
    return out
