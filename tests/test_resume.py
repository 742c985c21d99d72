"""Resume that a user can type: `lit-optim train resume=<run dir>`, `ckpt_path=last`, and a quoted checkpoint file.

Real runs of `lit-optim train` (its Hydra entry point, in this process): 3 steps, then resumed to 6 and to 8; the step
count continues, the optimizer state is the one saved (and equals a straight run's), the run's own config carries over
unless overridden, and the earlier run's directory is left as it was.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from cli_inprocess import run_train
from omegaconf import OmegaConf

# A constant LR, so a run resumed to 6 steps follows exactly the schedule of a straight 6-step run.
RUN = ["optim.lr=0.003", "scheduler=constant", "trainer.log_every_n_steps=1"]


def last(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)


def run_log(run: Path) -> str:
    return (run / "train.log").read_text()  # Hydra's log file of the run


def logged_steps(run: Path) -> list[int]:
    rows = [r for path in run.rglob("metrics.csv") for r in csv.DictReader(path.open())]
    return sorted(int(r["step"]) for r in rows if r.get("train/loss"))


def test_resume_run_dir_continues_with_its_config_and_optimizer_state(tmp_path):
    first, second, third, straight = (tmp_path / n for n in ("first", "second", "third", "straight"))
    assert run_train(first, *RUN, "trainer.max_steps=3", logger="csv")[0] == 0
    before = sorted(p.name for p in first.rglob("*") if p.is_file())
    overrides_before = (first / ".hydra" / "overrides.yaml").read_text()

    code, err = run_train(second, f"resume={first}", "trainer.max_steps=6", logger="csv")
    assert code == 0, err[-3000:]
    resumed = last(second)
    assert resumed["global_step"] == 6
    assert {int(s["step"]) for s in resumed["optimizer_states"][0]["state"].values()} == {6}  # not 3: restored
    assert sorted(p.name for p in (second / "checkpoints").glob("epoch*.ckpt")) == [
        "epoch=0-step=4.ckpt", "epoch=0-step=5.ckpt", "epoch=0-step=6.ckpt"]  # continued, not started over
    assert logged_steps(second) == [3, 4, 5]  # Lightning's 0-based logging step of optimizer steps 4..6
    # The first run's own config, with this command's override on top; recorded in the new run's .hydra/.
    assert resumed["hyper_parameters"]["optim"]["lr"] == 0.003
    config = OmegaConf.load(second / ".hydra" / "config.yaml")
    assert config.optim.lr == 0.003 and config.trainer.max_steps == 6 and config.scheduler.name == "constant"
    # The earlier run is left as it was.
    assert sorted(p.name for p in first.rglob("*") if p.is_file()) == before
    assert (first / ".hydra" / "overrides.yaml").read_text() == overrides_before

    # Exactly where a straight 6-step run is: weights and optimizer state.
    assert run_train(straight, *RUN, "trainer.max_steps=6")[0] == 0
    reference = last(straight)
    for key, value in reference["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    for p, state in reference["optimizer_states"][0]["state"].items():
        for name, value in state.items():
            assert torch.equal(resumed["optimizer_states"][0]["state"][p][name], value), (p, name)

    # A resumed run resumes again (its saved overrides name the first run; that is not followed twice).
    code, err = run_train(third, f"resume={second}", "trainer.max_steps=8")
    assert code == 0, err[-3000:]
    assert last(third)["global_step"] == 8 and last(third)["hyper_parameters"]["optim"]["lr"] == 0.003


def test_ckpt_path_last_finds_the_previous_run(tmp_path):
    outputs = tmp_path / "outputs"  # Hydra's outputs/<date>/<time> layout
    first, later = outputs / "2026-01-01" / "10-00-00", outputs / "2026-01-02" / "09-00-00"
    # Nothing to resume yet: trains from scratch, as Lightning's `last` does.
    code, err = run_train(first, *RUN, "trainer.max_steps=2", "ckpt_path=last")
    assert code == 0, err[-3000:]
    assert "ckpt_path=last: no last checkpoint" in run_log(first) and last(first)["global_step"] == 2

    code, err = run_train(later, *RUN, "trainer.max_steps=4", "ckpt_path=last")
    assert code == 0, err[-3000:]
    assert f"ckpt_path=last: resuming from {first}/checkpoints/last.ckpt" in run_log(later)
    assert last(later)["global_step"] == 4
    assert sorted(p.name for p in (later / "checkpoints").glob("epoch*.ckpt")) == [
        "epoch=0-step=3.ckpt", "epoch=0-step=4.ckpt"]


def test_checkpoint_file_names_need_quotes(tmp_path):
    """Lightning's names contain '=', which Hydra's override grammar takes as syntax unless the value is quoted."""
    first = tmp_path / "first"
    assert run_train(first, *RUN, "trainer.max_steps=2")[0] == 0
    step1 = first / "checkpoints" / "epoch=0-step=1.ckpt"

    code, err = run_train(tmp_path / "unquoted", *RUN, "trainer.max_steps=3", f"ckpt_path={step1}")
    assert code == 1 and "mismatched input '='" in err  # Hydra's own error

    # As the README writes it for the shell: 'ckpt_path="..."' reaches Hydra as ckpt_path="...".
    code, err = run_train(tmp_path / "quoted", *RUN, "trainer.max_steps=3", f'ckpt_path="{step1}"')
    assert code == 0, err[-3000:]
    assert sorted(p.name for p in (tmp_path / "quoted" / "checkpoints").glob("epoch*.ckpt")) == [
        "epoch=0-step=2.ckpt", "epoch=0-step=3.ckpt"]
