"""The CPU smoke tests of benchmarks/optimizer_step.py (the optimizer step alone, every AdamW variant side by side):
its variant syntax, its rows (measured, skipped with a reason, failed), its bytes model, and the documented smoke
command as a user runs it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # the script's dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("optimizer_step")


def test_variant_syntax(bench):
    v = bench.parse_variant("flash_adamw:master_weight_bits=None,betas=(0.9,0.95),fused=true,mode=fast")
    assert v.name == "flash_adamw"
    assert v.hyperparameters == {"master_weight_bits": None, "betas": (0.9, 0.95), "fused": True, "mode": "fast"}
    assert bench.parse_variant("adamw_torch_fused").hyperparameters == {}
    assert bench.parse_variant("x:lr=1e-4").hyperparameters == {"lr": 1e-4}
    for bad in ("adamw:lr", ":lr=1", "adamw:=3"):
        with pytest.raises(Exception, match="variant"):
            bench.parse_variant(bad)


def test_cpu_rows_measured_skipped_and_failed(bench, tmp_path, capsys):
    out = tmp_path / "step.json"
    variants = ["adamw_torch_fused", "adamw_bnb_8bit", "adamw_fp8", "no_such_optimizer",
                "torch.optim.AdamW:fused=True,betas=(0.9,0.95)", "no_such_package.AdamW",
                "adamw_torch_fused:no_such_argument=1"]
    result = bench.main(["--device", "cpu", "--tensors", "2", "--dim", "64", "--steps", "2", "--warmup", "1",
                         "--copy-mib", "8", "--out", str(out), *(a for v in variants for a in ("--variant", v))])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result, default=str))
    meta, rows = data["meta"], {r["variant"]: r for r in data["rows"]}
    assert list(rows) == variants
    assert meta["params"] == 2 * 64 * 64 and meta["dtype"] == "bfloat16" and meta["device_name"] == "cpu"
    assert meta["copy"]["tb_s"] > 0 and meta["copy"]["copy_correct"] and meta["copy"]["timer"] == "host clock"

    fused, bnb, direct = rows["adamw_torch_fused"], rows["adamw_bnb_8bit"], rows[variants[4]]
    for r in (fused, bnb, direct):
        assert r["status"] == "ok", r
        assert len(r["times_ms"]) == 2 and r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert r["first_step_ms"] > 0 and r["tb_s"] > 0 and 0 < r["pct_of_copy"]
        assert r["params_finite"] and r["changed_fraction_tensor0"] > 0.5
        # the bytes model: read and write the parameter, read the gradient, read and write the state
        assert r["model_bytes_per_param"] == pytest.approx(2 * 2 + 2 + 2 * r["state_bytes_per_param"])
        assert r["tb_s"] == pytest.approx(r["model_bytes"] / (r["median_ms"] * 1e-3) / 1e12)
    # bf16 parameters: torch's AdamW keeps bf16 moments (4 B/param, plus the step counters); 14 B/param moved
    assert fused["state_bytes_per_param"] == pytest.approx(4.0, abs=0.01)
    assert fused["model_bytes_per_param"] == pytest.approx(14.0, abs=0.02)
    assert fused["built"] == "lit_optim.build_optimizer" and fused["class"] == "torch.optim.AdamW"
    assert 2.0 < bnb["state_bytes_per_param"] < 2.5 and bnb["quantized_params"] == 2 * 64 * 64
    assert direct["built"] == "directly" and direct["hyperparameters"] == {"fused": True, "betas": "(0.9, 0.95)"}

    assert rows["adamw_fp8"]["status"] == "skipped" and "CUDA" in rows["adamw_fp8"]["reason"]
    assert rows["no_such_optimizer"]["status"] == "skipped" and "not in lit_optim's registry" in \
        rows["no_such_optimizer"]["reason"]
    assert rows["no_such_package.AdamW"]["status"] == "skipped"
    bad = rows["adamw_torch_fused:no_such_argument=1"]
    assert bad["status"] == "error" and "no_such_argument" in bad["reason"]
    # the Markdown table last: measured rows in it, the others listed with their reasons under it
    table = printed[printed.index("| variant |"):]
    assert "| adamw_torch_fused | 4.00" in table and "- adamw_fp8: skipped:" in table
    assert "copy speed" in printed and "device: cpu" in printed


def test_rounds_repeat_the_list(bench, tmp_path, capsys):
    result = bench.main(["--device", "cpu", "--tensors", "1", "--dim", "64", "--steps", "1", "--warmup", "0",
                         "--copy-mib", "1", "--rounds", "2", "--variant", "adamw_torch_fused", "--variant",
                         "adamw_fp8"])
    assert [(r["round"], r["variant"], r["status"]) for r in result["rows"]] == [
        (1, "adamw_torch_fused", "ok"), (1, "adamw_fp8", "skipped"),
        (2, "adamw_torch_fused", "ok"), (2, "adamw_fp8", "skipped")]
    printed = capsys.readouterr().out
    assert "| adamw_torch_fused (round 2) |" in printed and "- adamw_fp8 (round 1): skipped" in printed


def test_e2e_only_prints_the_big_models_command(bench, capsys):
    assert bench.main(["--e2e"]) == {"e2e_command": bench.E2E_COMMAND}
    assert capsys.readouterr().out.strip() == bench.E2E_COMMAND
    assert "benchmarks/big_models.py --suite fused" in bench.E2E_COMMAND
    big = load_benchmark("big_models")
    rows = big.suite("fused")
    assert [r[0] for r in rows] == [f"fused {o}" for o in ("adamw_torch_fused", "adamw_fused_8bit", "adamw_fused_4bit",
                                                          "adamw_torch_8bit", "adamw_bnb_8bit")]
    for _, overrides, cache in rows:  # the memory-bound setting: 8B, seq 512, bs 1, no accumulation
        assert overrides[:len(big.MEMORY_BOUND)] == big.MEMORY_BOUND and cache is None
    labels = [r[0] for r in big.suite("memory_bound")]
    assert "adamw_fused_8bit" in labels and "adamw_fused_4bit" in labels


@pytest.mark.slow
def test_documented_cpu_smoke_command(tmp_path):
    """Exactly the README's smoke command, every default variant (torchao compiles on the CPU: tens of seconds)."""
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "optimizer_step.py"), "--device", "cpu",
                           "--tensors", "2", "--dim", "64", "--steps", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                              str(ROOT), os.environ.get("PYTHONPATH")]))})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    bench = load_benchmark("optimizer_step")
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == bench.DEFAULT_VARIANTS
    assert not [r for r in rows if r["status"] == "error"], rows
    ok = {r["variant"] for r in rows if r["status"] == "ok"}
    assert {"adamw_torch_fused", "adamw_torch_8bit", "adamw_torch_4bit", "adamw_bnb_8bit"} <= ok
    assert "| adamw_torch_fused |" in proc.stdout
