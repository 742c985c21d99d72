"""The `lit-optim` console script, run as a user runs it: a subprocess in a scratch directory.

`list` prints the registry; `train` trains the built-in LM with a progress bar and a falling loss; bad input fails
before step 1 with a short message and writes no checkpoint; a W&B logger that cannot start falls back to CSV.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from lit_optim.registry import list_optimizers

EXE = shutil.which("lit-optim")


def lit_optim(cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    assert EXE, "the lit-optim console script is not installed (pip install -e .)"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([EXE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def train_args(run_dir: Path, *overrides: str) -> list[str]:
    return ["train", f"hydra.run.dir={run_dir}", *overrides]


def metric_rows(root: Path) -> list[dict[str, str]]:
    rows = []
    for path in root.rglob("metrics.csv"):
        with path.open() as fh:
            rows.extend(csv.DictReader(fh))
    return rows


def losses(root: Path) -> list[float]:
    return [float(r["train/loss"]) for r in metric_rows(root) if r.get("train/loss")]


def test_list_prints_the_registry(tmp_path):
    proc = lit_optim(tmp_path, "list")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:2] == ["name", "backend"]
    listed = {line.split()[0] for line in lines[2:]}
    assert listed == set(list_optimizers())
    row = next(line for line in lines if line.startswith("paged_adamw_8bit "))
    assert "bitsandbytes" in row and "PagedAdamW8bit" in row and "paged" in row

    paged = lit_optim(tmp_path, "list", "*paged*")
    assert paged.returncode == 0
    assert {line.split()[0] for line in paged.stdout.splitlines()[2:]} == set(list_optimizers("*paged*"))


def test_train_shows_progress_and_the_loss_falls(tmp_path):
    run = tmp_path / "run"
    proc = lit_optim(tmp_path, *train_args(run, "trainer.max_steps=20", "logger=csv", "trainer.log_every_n_steps=1",
                                           "trainer.val_check_interval=20", "trainer.limit_val_batches=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Epoch 0: 100%" in proc.stdout and "train/loss=" in proc.stdout  # the progress bar, with the loss on it
    curve = losses(run)
    assert len(curve) == 20
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.3, curve
    assert any(r.get("val/loss") for r in metric_rows(run))
    assert (run / ".hydra" / "config.yaml").is_file()


BAD_INPUT = {
    # Hydra itself: an unknown group option, listing the valid ones.
    "unknown-optimizer": ("optim=adamw_8bt", 1,
                          ["Could not find 'optim/adamw_8bt'", "Available options in 'optim'", "adamw_8bit"]),
    # Hydra itself: a key the optimizer YAML does not have needs `+` to be added at all ...
    "unknown-key": ("optim.betaz=0.9", 1, ["Could not override 'optim.betaz'", "+optim.betaz=0.9"]),
    # ... and added, lit_optim refuses it: one line, the fix included, exit code 2.
    "unknown-hyperparameter": ("+optim.betaz=0.9", 2, ["lit-optim: Optimizer 'adamw_torch' (torch.optim.AdamW) does "
                                                       "not take hyperparameter 'betaz'. Did you mean betas?"]),
    "release-grads-not-bool": ("release_grads_after_step=maybe", 2,
                               ["lit-optim: release_grads_after_step must be True or False; got 'maybe'."]),
}
if not torch.cuda.is_available():
    # A GPU recipe on a machine without one is refused before the 8B model is built.
    BAD_INPUT["gpu-recipe-without-gpu"] = ("recipe=llama31_8b_adamw_8bit", 2,
                                           ["lit-optim: trainer.accelerator=gpu but this machine has no CUDA GPU."])


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory):
    """The bad-input commands, run side by side (each spends most of its time importing torch)."""
    dirs = {case: tmp_path_factory.mktemp(case) for case in BAD_INPUT}
    with ThreadPoolExecutor(len(BAD_INPUT)) as pool:
        procs = {case: pool.submit(lit_optim, d, *train_args(d / "run", BAD_INPUT[case][0], "logger=csv"))
                 for case, d in dirs.items()}
        return {case: (future.result(), dirs[case]) for case, future in procs.items()}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_fails_before_step_one(bad_input_runs, case):
    _, code, message = BAD_INPUT[case]
    proc, tmp_path = bad_input_runs[case]
    assert proc.returncode == code, proc.stderr[-3000:]
    for text in message:
        assert text in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "Epoch 0" not in proc.stdout
    assert not list(tmp_path.rglob("*.ckpt")) and not losses(tmp_path)
    if code == 2:  # our message is the last thing printed, on one line
        assert proc.stderr.strip().splitlines()[-1].startswith("lit-optim: ")


def test_wandb_that_cannot_start_falls_back_to_csv(tmp_path):
    """A real wandb.init failure (an invalid mode is refused by wandb's settings validation), no mocks."""
    run = tmp_path / "run"
    proc = lit_optim(tmp_path, *train_args(run, "logger=wandb", "+logger.mode=not_a_mode", "trainer.max_steps=4",
                                           "trainer.log_every_n_steps=1", "validate=false"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "W&B could not start" in proc.stderr and "logging to CSV instead" in proc.stderr
    assert len(losses(run / "csv")) == 4
    assert not list(run.rglob("*.wandb"))
