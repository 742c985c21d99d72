"""`lit-optim compare`: one `lit-optim train` process per optimizer (tiny model, CPU, 3 steps each), one table.

The comparison of three optimizers runs once for the module, one of them refused (LOMO steps in backward, so it
cannot clip by the global norm: trainer.gradient_clip_val=1.0 is fine for the other two). The table's numbers are
checked against each run's own metrics.csv, read here with the csv module, not with the code under test.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lit_optim.comparison import plots, table
from lit_optim.comparison.rows import GIB, HOST, MANAGED, Row, memory_parts
from lit_optim.comparison.runner import check_request, run_overrides
from lit_optim.errors import HyperparameterError, IncompatibleConfigError, UnknownOptimizerError
from lit_optim.run_metrics import RunMetrics, failure_reason

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["trainer.accelerator=cpu", "trainer.max_steps=3", "data.train_tokens=4096", "data.seq_len=32",
         "trainer.log_every_n_steps=1", "data.val_tokens=1024", "trainer.val_check_interval=3",
         "callbacks.step_timing.warmup_steps=1"]
OPTIMS = ["adamw_torch", "adafactor", "lomo"]
PNG = b"\x89PNG\r\n\x1a\n"


def env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """`lit-optim compare` as a user types it, in its own process; (stdout, output directory)."""
    cwd = tmp_path_factory.mktemp("compare")
    proc = subprocess.run(
        [sys.executable, "-m", "lit_optim.cli", "compare", f"optim={','.join(OPTIMS)}", *SMALL,
         "trainer.gradient_clip_val=1.0", "--out", "cmp", "--budget-gib", "1"],
        cwd=cwd, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, cwd / "cmp"


def logged(run_dir: Path) -> dict[str, list[float]]:
    """Every value of the run's metrics.csv by column, in file order (read independently of RunMetrics)."""
    (path,) = run_dir.glob("*/version_*/metrics.csv")
    out: dict[str, list[float]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if value:
                    out.setdefault(key, []).append(float(value))
    return out


def table_rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "comparison.csv") as f:
        return {r["optimizer"]: r for r in csv.DictReader(f)}


# --- the comparison, end to end ---------------------------------------------------------------------------------

def test_compare_writes_the_tables_prints_progress_and_the_markdown(compared):
    stdout, out = compared
    assert (out / "comparison.md").is_file() and (out / "comparison.csv").is_file()
    for i, name in enumerate(OPTIMS, 1):
        assert f"[{i}/3] {name}: running" in stdout
        assert (out / "runs" / name / "output.log").is_file()
    assert "[1/3] adamw_torch: ok in" in stdout and "[2/3] adafactor: ok in" in stdout
    assert "[3/3] lomo: failed in" in stdout
    assert (out / "comparison.md").read_text().strip() in stdout  # printed at the end, as written
    assert list(table_rows(out)) == OPTIMS  # one row per optimizer, in the order given


def test_table_numbers_are_the_runs_own_logged_metrics(compared):
    _, out = compared
    rows = table_rows(out)
    md = (out / "comparison.md").read_text()
    for name in ("adamw_torch", "adafactor"):
        m, row = logged(out / "runs" / name), rows[name]
        expected = {
            "final_train_loss": m["train/loss"][-1], "min_train_loss": min(m["train/loss"]),
            "final_val_loss": m["val/loss"][-1],
            "tokens_per_s": m["throughput/tokens_per_sec"][-1],
            "optimizer_step_ms": m["timing/optimizer_step_ms"][-1],
            "optimizer_step_share": m["timing/optimizer_step_share"][-1],
            "first_step_s": m["timing/warmup/first_optimizer_step_ms"][-1] / 1000,
            "launch_to_step1_s": m["timing/launch_to_first_step_s"][-1],
            "host_gib": max(m["memory/host_peak_rss_bytes"]) / GIB,
            "state_bytes_per_param": m["optim_state/bytes_per_param"][-1],
        }
        assert len(m["train/loss"]) == 3  # one per step: the runs got the shared overrides
        for key, value in expected.items():
            assert float(row[key]) == value, (name, key)
        assert row["peak_device_gib"] == row["managed_gib"] == ""  # a CPU run logs no device memory
        assert row["exit_code"] == "0" and row["reason"] == "" and row["fits_budget"] == "n/a"
        line = next(line for line in md.splitlines() if line.startswith(f"| `{name}` |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1:6] == ["ok", f"{expected['final_train_loss']:.4g}", f"{expected['min_train_loss']:.4g}",
                              f"{expected['final_val_loss']:.4g}", f"{expected['tokens_per_s']:,.0f}"]
        assert cells[-2:] == [f"{expected['state_bytes_per_param']:.3g}", "n/a"]
    assert float(rows["adamw_torch"]["state_bytes_per_param"]) == pytest.approx(8.0, abs=0.01)
    assert "| fits 1 GiB |" in md.splitlines()[0]


def test_a_refused_run_is_a_row_with_its_reason(compared):
    _, out = compared
    row = table_rows(out)["lomo"]
    output = (out / "runs" / "lomo" / "output.log").read_text()
    last = [line for line in output.splitlines() if line.startswith("lit-optim:")][-1]
    assert row["exit_code"] == "2" and row["reason"] == last
    assert "steps in backward" in last and "gradient_clip_val" in last
    empty = ("final_train_loss", "final_val_loss", "tokens_per_s", "state_bytes_per_param", "fits_budget")
    assert all(row[k] == "" for k in empty)
    md = (out / "comparison.md").read_text()
    assert "| `lomo` | failed (exit 2): Optimizer 'lomo' steps in backward" in md
    assert f"- `lomo` (exit 2): {last}" in md  # the whole line under the table


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                    reason="matplotlib is not installed (pip install -e '.[plots]'): the plots are skipped")
def test_plots_are_png_images(compared):
    _, out = compared
    for name in plots.FILES:
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000, name


def wandb_group_and_name(run_dir: Path) -> tuple[str, str]:
    from wandb.proto import wandb_internal_pb2

    from lit_optim.wandb_offline import iter_payloads

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")  # (wandb/latest-run links to it)
    for payload in iter_payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "run":
            return record.run.run_group, record.run.display_name
    raise AssertionError(f"no run record in {path}")


def test_python_api_returns_the_table_it_wrote_with_wandb_and_without_matplotlib(tmp_path, monkeypatch):
    """`lit_optim.compare(...)`: the same table as the files, rows with the run's metrics. With logger=wandb the run
    is in the W&B group named after the output directory, named after its optimizer, and the table is read from the
    CSV beside it. Without matplotlib the tables are still written and one line says how to get the plots."""
    import lit_optim

    monkeypatch.setattr(plots, "have_matplotlib", lambda: False)
    for key, value in env().items():
        monkeypatch.setenv(key, value)
    lines: list[str] = []
    result = lit_optim.compare(optims=["adafactor"], overrides=[*SMALL, "logger=wandb"], out=tmp_path / "api",
                               echo=lines.append)
    assert wandb_group_and_name(result.path / "runs" / "adafactor") == ("api", "adafactor")
    assert result.path == (tmp_path / "api").resolve()
    assert result.table == (result.path / "comparison.md").read_text().strip() == str(result)
    assert result.files == [result.path / "comparison.md", result.path / "comparison.csv"]
    assert not list(result.path.glob("*.png")) and plots.NO_MATPLOTLIB in lines[-1]
    (row,) = result.rows
    m = logged(result.path / "runs" / "adafactor")
    assert row.ok and row.final_loss == m["train/loss"][-1] and row.tokens_per_s == m["throughput/tokens_per_sec"][-1]
    assert float(table_rows(result.path)["adafactor"]["final_train_loss"]) == row.final_loss
    # Where the memory went on the CPU: the parts add up to the process's peak RSS (nothing outside it).
    assert sum(row.memory_parts.values()) == pytest.approx(max(m["memory/host_peak_rss_bytes"]))
    assert row.memory_parts["weights"] == m["model/weight_bytes"][-1] == row.memory_parts["gradients"]
    # Loss against wall time: logged at the loss's steps, after the launch-to-step-1 time.
    # (launch_to_first_step_s reads the process's age in 10 ms clock ticks: equal up to one tick)
    assert len(m["time/since_launch_s"]) == 3
    assert m["time/since_launch_s"][0] >= m["timing/launch_to_first_step_s"][0] - 0.011
    with pytest.raises(IncompatibleConfigError, match="already holds a comparison"):
        lit_optim.compare(optims=["adafactor"], overrides=SMALL, out=tmp_path / "api", echo=None)


# --- what each run is given, checked without running it --------------------------------------------------------

def test_run_overrides_csv_by_default_wandb_grouped_and_the_optimizer_last(tmp_path):
    run = run_overrides("adamw_8bit", ["recipe=llama31_8b", "optim.lr=2e-5"], tmp_path / "r", "2026-12-06_07-08-26")
    assert run[:2] == ["recipe=llama31_8b", "optim.lr=2e-5"]
    assert "logger=csv" in run and "++callbacks.checkpoint=null" in run
    assert run[-2:] == ["optim=adamw_8bit", f"hydra.run.dir='{tmp_path / 'r'}'"]
    wandb = run_overrides("adamw_8bit", ["logger=wandb"], tmp_path, "2026-12-06_07-08-26")
    assert "++logger.group='2026-12-06_07-08-26'" in wandb and "++logger.name='adamw_8bit'" in wandb
    assert "logger=csv" not in wandb
    kept = run_overrides("sgd", ["callbacks.checkpoint.every_n_train_steps=5"], tmp_path, "g")
    assert "++callbacks.checkpoint=null" not in kept


def test_seed_experiment_composes_one_optimizer_per_run(tmp_path):
    """`lit-optim compare recipe=llama31_8b optim=adamw_torch,paged_adamw_32bit,adamw_8bit,paged_adamw_8bit`: each
    run's overrides give the seed recipe's settings with that run's optimizer (optim= after the recipe wins)."""
    from hydra import compose, initialize_config_module

    seed = ["adamw_torch", "paged_adamw_32bit", "adamw_8bit", "paged_adamw_8bit"]
    with initialize_config_module("lit_optim.conf", version_base="1.3"):
        for name in check_request(",".join(seed), ["recipe=llama31_8b"]):
            run = [o for o in run_overrides(name, ["recipe=llama31_8b"], tmp_path, "g") if "hydra." not in o]
            cfg = compose("train", overrides=[*run, f"output_dir={tmp_path}"])
            assert cfg.optim.name == name and cfg.optim.lr == 1e-5
            assert (cfg.model.hidden_size, cfg.trainer.accumulate_grad_batches) == (4096, 32)
            assert cfg.logger._target_.endswith("CSVLogger") and cfg.callbacks.checkpoint is None
            assert cfg.callbacks.comparison_recorder._target_.endswith("ComparisonRecorder")
        assert compose("train", overrides=["recipe=llama31_8b"]).optim.name == "adamw_torch"


@pytest.mark.parametrize("optims, overrides, error, match", [
    ("", [], HyperparameterError, "needs optimizers to compare"),
    ("adamw_torch,adamw_torch", [], HyperparameterError, "more than once"),
    ("adamw_torhc", [], UnknownOptimizerError, "adamw_torch"),
    ("sgd", ["optim=adamw_torch"], HyperparameterError, "give the optimizers once"),
    ("sgd", ["-m"], IncompatibleConfigError, "drop -m"),
    ("sgd", ["hydra.run.dir=x"], IncompatibleConfigError, "--out DIR"),
])
def test_bad_requests_are_refused_before_anything_runs(optims, overrides, error, match):
    with pytest.raises(error, match=match):
        check_request(optims, overrides)


def test_cli_refuses_a_missing_optimizer_list_with_one_line(capsys):
    from lit_optim.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["compare", "trainer.max_steps=5"])
    assert exc.value.code == 2 and "name the optimizers once, e.g. optim=" in capsys.readouterr().err
    assert main(["compare", "optim=adamw_torhc"]) == 2
    assert capsys.readouterr().err.startswith("lit-optim: ")


# --- rows: memory parts, fits, failure reasons --------------------------------------------------------------------

def test_memory_parts_and_fits_of_a_gpu_run():
    m = RunMetrics({
        "memory/peak_allocated_bytes": [(0, 30 * GIB), (9, 31 * GIB)], "memory/peak_reserved_bytes": [(9, 33 * GIB)],
        "memory/managed_bytes": [(9, 18 * GIB)], "model/weight_bytes": [(9, 15 * GIB)],
        "model/grad_bytes": [(9, 15 * GIB)], "optim_state/bytes_gpu": [(9, 0.5 * GIB)],
        "optim_state/bytes_cpu": [(9, 0.25 * GIB)], "optim_state/bytes_cpu_pinned": [(9, 0.25 * GIB)],
    })
    parts, on = memory_parts(m)
    assert on == "device" and parts == {"weights": 15 * GIB, "gradients": 15 * GIB, "optimizer state": 0.5 * GIB,
                                        "rest": 0.5 * GIB, MANAGED: 18 * GIB, HOST: 0.5 * GIB}
    row = Row("paged_adamw_8bit", Path("."), 0, peak_device_gib=31, peak_reserved_gib=33, budget_gib=40)
    assert row.fits == "yes" and Row("x", Path("."), 0, peak_reserved_gib=41, budget_gib=40).fits == "no"
    assert Row("x", Path("."), 3, reason="lit-optim: out of memory", budget_gib=40).fits == "no"
    assert Row("x", Path("."), 2, budget_gib=40).fits == "" and Row("x", Path("."), 0).fits == ""
    assert "| fits 40 GiB |" in table.markdown([row]) and "fits_budget" in table.csv_text([row])


def test_weight_and_gradient_bytes_count_no_gradients_for_in_backward_optimizers():
    import torch

    import lit_optim
    from lit_optim.comparison.recorder import weight_and_grad_bytes

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    n = sum(p.numel() for p in model.parameters())
    assert weight_and_grad_bytes(model, [lit_optim.build_optimizer(model, "adamw_torch")]) == (4 * n, 4 * n)
    assert weight_and_grad_bytes(model, [lit_optim.build_optimizer(model, "lomo", lr=1e-3)]) == (4 * n, 0)


def test_recorder_adds_a_csv_next_to_any_other_logger(tmp_path):
    from harness import run_task

    from lit_optim.comparison.recorder import ComparisonRecorder

    _, trainer, losses = run_task({"name": "adamw_torch", "lr": 1e-3}, 3, callbacks=[ComparisonRecorder()],
                                  default_root_dir=tmp_path, log_every_n_steps=1)
    m = RunMetrics.find(tmp_path)
    assert m.path.parent.parent.name == "comparison_csv"
    assert [s for s, _ in m.series["time/since_launch_s"]] == [0, 1, 2]
    assert all(math.isfinite(v) for v in m.values("model/weight_bytes"))


def test_failure_reason_is_the_last_lit_optim_line_else_the_error():
    out = "lit-optim: finished sgd after 3 optimizer steps\nlit-optim: out of memory: this run ... To fit: ...\n"
    assert failure_reason(out, 3) == "lit-optim: out of memory: this run ... To fit: ..."
    assert failure_reason(out, 0) is None
    assert failure_reason("Traceback...\n  File x\nRuntimeError: boom\n", 1) == "RuntimeError: boom"
    assert failure_reason("", -9) == "killed by signal 9 (out of host memory?)"
    assert failure_reason("", 7) == "exit status 7"
