"""FSDP2 (`fully_shard`, DTensor parameters) on two CPU processes (gloo), checkpointed with torch.distributed.checkpoint
(`get_state_dict` / `dcp.save`, then in new processes `dcp.load` / `set_state_dict`); tests/fsdp2_resume.py does the
runs. A run resumed from the sharded checkpoint must end, on every rank, with exactly the parameter shards and
optimizer state of a run that went straight through.

torch AdamW (`adamw_torch` and `adamw_torch_fused`, built through lit_optim) resumes exactly: its moments are DTensors
sharded like the parameters. lit_optim's fused low-bit state is plain tensors per local shard (flat codes and
scales); DCP takes a plain tensor for a replicated one, writes a single rank's copy and loads it on every rank, so the
other rank resumes with foreign codes, silently. That is pinned below: it is one reason the fused names refuse FSDP2
before step 1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "fsdp2_resume.py"
NAMES = ["adamw_torch", "adamw_torch_fused", "adamw_fused_8bit"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2_resume")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")}
    for mode in ("straight", "resume"):  # each in its own processes and process group
        proc = subprocess.run([sys.executable, str(SCRIPT), mode, str(root), *NAMES], capture_output=True, text=True,
                              timeout=300, env=env, cwd=root)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def _load(runs, name, mode, rank, when=""):
    base = runs / name / mode
    err = base / f"rank{rank}.err"
    assert not err.exists(), err.read_text()
    return torch.load(base / f"rank{rank}{when}.pt", map_location="cpu", weights_only=True)


def _differ(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys() and a
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("name", ["adamw_torch", "adamw_torch_fused"])
def test_fsdp2_adamw_torch_resumes_exactly_from_sharded_checkpoint(runs, name):
    for rank in range(2):
        for when in (".mid", ""):  # at the checkpoint (saved vs loaded) and K steps after it
            a, b = _load(runs, name, "straight", rank, when), _load(runs, name, "resume", rank, when)
            assert a["dtensor"] == b["dtensor"] == "DTensor"
            assert _differ(a["params"], b["params"]) == [], (rank, when)
            assert _differ(a["state"], b["state"]) == [], (rank, when)
        # Each rank holds its own 32 of 64 rows, moments included, and the last K steps moved them.
        assert a["params"]["0.weight"].shape == a["state"]["0.weight.exp_avg"].shape == (32, 64)
        assert float(a["state"]["0.weight.step"]) == 6.0
        mid = _load(runs, name, "straight", rank, ".mid")
        assert all(not torch.equal(v, mid["params"][k]) for k, v in a["params"].items())


def test_fsdp2_fused_8bit_state_is_not_resharded_by_dcp(runs):
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(runs / "adamw_fused_8bit" / "ckpt")).read_metadata().state_dict_metadata
    # The parameters are saved as two row shards; the codes of rank 0's and rank 1's shards as one "replicated" tensor.
    assert len(meta["model.0.weight"].chunks) == 2
    codes = meta["optim.state.0.weight.exp_avg"]
    assert tuple(codes.size) == (2048,) and len(codes.chunks) == 1
    loaded = [_differ(_load(runs, "adamw_fused_8bit", "straight", r, ".mid")["state"],
                      _load(runs, "adamw_fused_8bit", "resume", r, ".mid")["state"]) for r in range(2)]
    # One rank gets its own codes back, the other gets them too, in place of its own: no error, a different run.
    assert sorted(map(bool, loaded)) == [False, True], loaded
    assert "0.weight.exp_avg" in max(loaded, key=len)
