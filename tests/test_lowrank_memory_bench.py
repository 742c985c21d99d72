"""The CPU smoke tests of the low-rank GPU benchmarks: benchmarks/lowrank_memory.py --tiny runs every configuration and
its numbers show what each method is for; benchmarks/galore_svd.py --tiny compares the projector's solvers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_benchmark(name: str = "lowrank_memory"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_memory_benchmark_runs_and_shows_the_savings(tmp_path, capsys):
    bench = load_benchmark()
    out = tmp_path / "lowrank_memory.json"
    assert bench.main(["--tiny", "--steps", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    rows = {r["label"]: r for r in data["rows"]}
    assert set(rows) == {c[0] for c in bench.CONFIGS} and not any("error" in r for r in rows.values())
    assert data["meta"]["tiny"] and data["meta"]["rank"] == 16
    for label in rows:
        assert label in printed

    weights = rows["adamw_torch"]["weights_bytes"]
    # In backward, gradients never coexist: the most alive at once is far below all of them.
    assert rows["adamw_torch"]["max_live_grad_bytes"] == weights
    for label, r in rows.items():
        if r["in_backward"]:
            assert r["max_live_grad_bytes"] < 0.5 * weights, label
        assert all(x == x for x in r["losses"]), label  # finite
    # State: AdamW 8 bytes/param; Adam-mini about half; low-rank methods less; LOMO none.
    adamw = rows["adamw_torch"]["state_bytes"]
    assert abs(adamw - 2 * weights) < 0.01 * adamw
    assert rows["adamw_torch in_backward"]["state_bytes"] == adamw
    assert 0.45 * adamw < rows["adam_mini"]["state_bytes"] < 0.55 * adamw
    for label in ("galore_adamw", "galore_adamw_8bit", "apollo_adamw", "apollo_mini"):
        assert rows[label]["state_bytes"] < 0.5 * adamw, label
        assert rows[label]["state_bytes"] == rows[f"{label}_layerwise"]["state_bytes"], label
    assert rows["apollo_mini"]["state_bytes"] < rows["apollo_adamw"]["state_bytes"]
    assert rows["lomo"]["state_bytes"] == 0 and rows["adalomo"]["state_bytes"] < 0.05 * adamw


def test_tiny_projector_benchmark_compares_the_solvers_on_real_gradients(tmp_path):
    bench = load_benchmark("galore_svd")
    out = tmp_path / "galore_svd.json"
    assert bench.main(["--tiny", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    shapes = {tuple(r["shape"]) for r in rows}
    assert len(shapes) >= 3  # attention and MLP weights of the tiny Llama
    assert {r["method"] for r in rows} == {"svd", "gram_eigh", "lowrank"}  # no CUDA: no gesvdj
    for r in rows:
        # The exact SVD against itself is 1; the Gram route finds the same subspace.
        if r["method"] in ("svd", "gram_eigh"):
            assert r["kept_energy_vs_svd"] > 0.999, r
    assert set(data["refresh_ms"]) == {"svd", "gram_eigh", "lowrank"}


def test_tiny_lightning_memory_benchmark_runs_each_configuration_through_the_trainer(tmp_path):
    bench = load_benchmark("lightning_memory")
    out = tmp_path / "lightning_memory.json"
    names = ["adamw_torch", "adamw_torch in_backward", "galore_adamw_8bit_layerwise", "lomo"]
    assert bench.main(["--tiny", "--steps", "2", "--names", *names, "--out", str(out)]) == 0
    rows = {r["label"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == names
    assert all(r["global_step"] == 2 for r in rows.values())  # in-backward steps advance Lightning's step too
    assert rows["adamw_torch in_backward"]["class"] == "InBackwardOptimizer"
    adamw = rows["adamw_torch"]["state_bytes"]
    assert rows["adamw_torch in_backward"]["state_bytes"] == adamw
    assert abs(adamw - 2 * rows["adamw_torch"]["weights_bytes"]) < 0.01 * adamw  # two fp32 moments (+ step counters)
    assert 0 < rows["galore_adamw_8bit_layerwise"]["state_bytes"] < 0.5 * adamw
    assert rows["lomo"]["state_bytes"] == 0
