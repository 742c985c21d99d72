"""Every optimizer family that runs on CPU, under DDP (two CPU processes, gloo, one process group for all names): it
trains and the ranks end with identical parameters and optimizer state (low-bit codes included). For GaLore,
gradients are all-reduced before the step, so every rank computes the same SVD (APOLLO's seeded projections and
Adam-mini's block statistics are computed from the same all-reduced numbers in the same way;
tests/ddp_consistency.py takes any names). In-backward is refused under DDP: see test_in_backward.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# One name per DDP-supported family of the README's support matrix (lit_optim/support_matrix.py names this test).
NAMES = ["adamw_torch", "adamw_torch_fused", "adamw_torch_8bit", "adamw_torch_4bit", "adamw_bnb_8bit",
         "paged_adamw_8bit", "galore_adamw", "apollo_adamw", "adam_mini", "adamw_fused_8bit", "adamw_fused_4bit",
         "muon", "adafactor_torch", "stable_adamw", "schedule_free_adamw"]


def test_every_ddp_family_keeps_ranks_identical(tmp_path):  # the support matrix's DDP cells rest on it: not `slow`
    out = tmp_path / "ddp.json"
    script = Path(__file__).resolve().parent / "ddp_consistency.py"
    env = {k: v for k, v in os.environ.items()  # a port left by an earlier in-process DDP setup would hang rank 0
           if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.run([sys.executable, str(script), str(out), *NAMES], capture_output=True, text=True,
                          timeout=400, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    for name in NAMES:
        r = results[name]
        assert r["ranks"] == 2 and r["global_step"] == 4, (name, r)
        assert r["equal"], f"{name}: ranks diverged under DDP"
        assert sum(r["losses"][-2:]) < sum(r["losses"][:2]) - 0.2, (name, r["losses"])
