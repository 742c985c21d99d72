"""GaLore, APOLLO and Adam-mini under DDP (two CPU processes, gloo): they train and the ranks stay identical --
gradients are all-reduced before the step, the SVD / seeded projections / block statistics are computed from the same
numbers on every rank. (In-backward is refused under DDP: see test_in_backward.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

NAMES = ["galore_adamw", "apollo_adamw", "adam_mini"]


@pytest.mark.slow
def test_lowrank_optimizers_keep_ddp_ranks_identical(tmp_path):
    out = tmp_path / "ddp.json"
    script = Path(__file__).resolve().parent / "ddp_consistency.py"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(script), str(out), *NAMES], capture_output=True, text=True,
                          timeout=400, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    for name in NAMES:
        r = results[name]
        assert r["ranks"] == 2 and r["global_step"] == 6, (name, r)
        assert r["equal"], f"{name}: ranks diverged under DDP"
        assert sum(r["losses"][-2:]) < sum(r["losses"][:2]) - 0.2, (name, r["losses"])
