"""benchmarks/lowbit_accuracy.py (issue 13's accuracy sweep): its summary of the cells, and one real cell (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_optimizer_step_bench import load_benchmark

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("lowbit_accuracy")


def test_summary_means_over_the_seeds_where_every_optimizer_ran(bench):
    opts = bench.OPTIMIZERS
    cells = {
        (1, 1e-3): dict(zip(opts, (1.00, 0.99, 0.98, 0.985))),
        (2, 1e-3): dict(zip(opts, (2.00, 1.99, 1.995, 1.98))),
        (3, 1e-3): dict(zip(opts[:3], (9.0, 9.0, 9.0))),  # bitsandbytes failed: the seed is left out of the mean
        (1, 2e-3): dict(zip(opts, (0.50, 0.50, 0.50, 0.50))),
    }
    first, second = bench.summarise(cells, opts)
    assert first["lr"] == 1e-3 and first["seeds"] == [1, 2]
    assert first["mean_val_loss"][bench.OURS] == pytest.approx(1.49)
    assert first["ours_vs_fp32"] == pytest.approx(1.49 / 1.5 - 1)
    # the better of the two others by mean: torchao (1.4875) against bitsandbytes (1.4825)
    assert first["ours_vs_best_other"] == pytest.approx(1.49 / 1.4825 - 1)
    assert first["seeds_no_worse"] == 0  # seed 1: 0.99 > 0.98; seed 2: 1.99 > 1.98
    assert second["seeds_no_worse"] == 1 and second["ours_vs_best_other"] == 0.0  # a tie counts as no worse
    table = bench.markdown([first, second], opts)
    assert "| 0.001 | 2 | 1.5000 | 1.4900 | 1.4875 | 1.4825 | -0.67% | +0.51% | 0/2 |" in table


def test_a_cell_reads_the_compare_table_s_validation_loss(bench, tmp_path):
    cell = bench.cell_dir(tmp_path, 7, 2e-3)
    cell.mkdir(parents=True)
    (cell / "comparison.csv").write_text("optimizer,exit_code,final_val_loss\nadamw_torch,0,0.85\nlomo,2,\n")
    assert bench.read_cell(cell) == {"adamw_torch": 0.85}  # a failed run gives no value
    assert bench.run_cell(tmp_path, 7, 2e-3, ("adamw_torch",), []) == cell  # already there: read, not rerun


def test_a_request_compare_refuses_stops_the_sweep_with_compare_s_reason(bench, tmp_path):
    with pytest.raises(SystemExit, match=r"stopped \(exit 2\): lit-optim: Unknown optimizer 'adamw_nope'"):
        bench.run_cell(tmp_path, 1, 1e-3, ("adamw_torch", "adamw_nope"), [])
    assert not (bench.cell_dir(tmp_path, 1, 1e-3) / "comparison.csv").exists()


@pytest.mark.slow
def test_one_real_cell_through_lit_optim_compare(tmp_path):
    out = tmp_path / "acc.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "lowbit_accuracy.py"), "--seeds", "5", "--lrs", "2e-3",
         "--optimizers", "adamw_torch", "adamw_fused_8bit", "--steps", "6", "--workdir", str(tmp_path / "w"),
         "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())["summary"]
    losses = row["mean_val_loss"]
    assert set(losses) == {"adamw_torch", "adamw_fused_8bit"} and all(2.0 < v < 6.0 for v in losses.values())
    assert abs(row["ours_vs_fp32"]) < 0.05
    assert "| 0.002 | 1 |" in proc.stdout
