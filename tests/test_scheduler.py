"""Warmup + cosine / linear / constant schedules: their values, torchao's tensor learning rate, and stepping once per
optimizer step (not per batch) inside Lightning."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from harness import run_task
from lightning.pytorch.callbacks import Callback
from torch import nn

import lit_optim
from lit_optim.errors import HyperparameterError
from lit_optim.scheduler import WarmupSchedule, build_scheduler, lr_factor


def expected(step: int, schedule: str, warmup: int, total: int, floor: float) -> float:
    """The schedules written out independently of lit_optim.scheduler."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    t = min(1.0, (step - warmup) / (total - warmup))
    shape = 1 - t if schedule == "linear" else (1 + math.cos(math.pi * t)) / 2
    return floor + (1 - floor) * shape


def test_known_values():
    kw = dict(warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [lr_factor(s, schedule="cosine", **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, schedule="cosine", **kw) == 1.0
    assert lr_factor(9, schedule="cosine", **kw) == pytest.approx(0.55)  # half-way: (1 + 0.1) / 2
    assert lr_factor(14, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_factor(9, schedule="linear", **kw) == pytest.approx(0.55)
    assert lr_factor(6, schedule="linear", **kw) == pytest.approx(0.1 + 0.9 * 0.8)
    assert lr_factor(100, schedule="linear", **kw) == pytest.approx(0.1)  # past the end: stays at the floor
    assert lr_factor(9, schedule="constant", **kw) == 1.0
    assert lr_factor(0, schedule="cosine", warmup_steps=0, total_steps=10, min_lr_ratio=0.0) == 1.0


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup, floor", [(0, 0.0), (3, 0.0), (3, 0.2)])
def test_schedule_on_every_group(schedule, warmup, floor):
    model = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 4))
    opt = lit_optim.build_optimizer(model, "adamw_torch", lr=1e-2, lr_scales={"embedding": 0.1})
    base = {g["name"]: g["lr"] for g in opt.param_groups}
    total = 12
    sched = build_scheduler(opt, {"name": schedule, "warmup_steps": warmup, "min_lr_ratio": floor}, total)
    for step in range(total + 3):
        factor = expected(step, schedule, warmup, total, floor)
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(base[g["name"]] * factor, rel=1e-9, abs=1e-15), (step, g["name"])
        opt.step()
        sched.step()


def test_warmup_ratio_and_config_errors():
    opt = lit_optim.build_optimizer(nn.Linear(4, 4), "adamw_torch", lr=1.0)
    sched = build_scheduler(opt, {"name": "linear", "warmup_ratio": 0.25}, total_steps=20)
    assert sched.warmup_steps == 5 and sched.total_steps == 20 and sched.schedule == "linear"
    for bad, match in [
        ({"name": "exponential"}, "Unknown LR schedule 'exponential'"),
        ({"name": "cosine", "warmup_steps": 2, "warmup_ratio": 0.1}, "either scheduler.warmup_steps or"),
        ({"name": "cosine", "warmup_ratio": 1.5}, "warmup_ratio must be in"),
        ({"name": "cosine", "min_lr_ratio": -0.1}, "min_lr_ratio in"),
        ({"name": "cosine", "decay": 0.1}, r"does not take \['decay'\]"),
    ]:
        with pytest.raises(HyperparameterError, match=match):
            build_scheduler(opt, bad, total_steps=20)


def test_torchao_tensor_lr_is_updated_in_place_and_does_not_compound():
    torch.manual_seed(0)
    model = nn.Linear(64, 64)  # shapes the other tests already compiled torchao's step for
    opt = lit_optim.build_optimizer(model, "adamw_torch_8bit", lr=1e-2, weight_decay=0.1)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert all(isinstance(t, torch.Tensor) for t in lrs.values())
    sched = WarmupSchedule(opt, schedule="cosine", total_steps=8, warmup_steps=2, min_lr_ratio=0.1)
    assert all(type(g["initial_lr"]) is float for g in opt.param_groups)
    assert sched.base_lrs == pytest.approx([1e-2, 1e-2], rel=1e-6)
    weight = model.weight.detach().clone()
    for step in range(10):
        for g in opt.param_groups:
            assert g["lr"] is lrs[g["name"]], "the scheduler replaced torchao's lr tensor"
            # A compounding schedule would give 1e-2 * f(0) * f(1) * ... * f(step) here.
            assert float(g["lr"]) == pytest.approx(1e-2 * expected(step, "cosine", 2, 8, 0.1), rel=1e-6)
        model(torch.randn(4, 64)).square().mean().backward()
        opt.step()  # torchao raises if the lr ever became a float
        opt.zero_grad()
        sched.step()
    assert not torch.equal(weight, model.weight)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(1e-3, rel=1e-6)  # the floor


def test_pytorch_lambda_lr_no_longer_compounds_on_torchao_lr():
    """The fact scheduler.py's docstring states: on this torch, LambdaLR with torchao's tensor lr gives exact values."""
    model = nn.Linear(64, 64)
    opt = lit_optim.build_optimizer(model, "adamw_torch_8bit", lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    for step in range(1, 4):
        model(torch.randn(4, 64)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        assert float(opt.param_groups[0]["lr"]) == pytest.approx(1e-2 * 0.5**step, rel=1e-6)


class LrPerBatch(Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.steps: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(float(trainer.optimizers[0].param_groups[0]["lr"]))
        self.steps.append(trainer.global_step)


def test_lightning_steps_the_schedule_per_optimizer_step():
    """With accumulate_grad_batches=2 the LR changes every second batch, following the optimizer steps."""
    recorder = LrPerBatch()
    steps, lr = 6, 1e-2
    _, trainer, losses = run_task(
        {"name": "adamw_torch_8bit", "lr": lr}, steps, callbacks=[recorder], accumulate_grad_batches=2,
        scheduler={"name": "linear", "warmup_steps": 2, "min_lr_ratio": 0.0},
    )
    assert len(losses) == 2 * steps and trainer.global_step == steps
    assert recorder.steps == [s for s in range(steps) for _ in range(2)]
    want = [lr * expected(s, "linear", 2, steps, 0.0) for s in recorder.steps]
    assert recorder.lrs == pytest.approx(want, rel=1e-6)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(scheduler, WarmupSchedule) and scheduler.last_epoch == steps and scheduler.total_steps == steps
    assert isinstance(trainer.optimizers[0].param_groups[0]["lr"], torch.Tensor)  # still torchao's tensor


class _Linear64(lit_optim.OptimizerMixin, L.LightningModule):
    def __init__(self, optim, scheduler):
        super().__init__(optim=optim, scheduler=scheduler)
        self.net = nn.Linear(64, 64)

    def training_step(self, batch, batch_idx):
        return self.net(batch).square().mean()


class LrPerStep(Callback):
    """The LR each optimizer step used, read just before it ran."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append(float(optimizer.param_groups[0]["lr"]))


@pytest.mark.parametrize("name", ["adamw_torch", "adamw_torch_8bit"])
def test_resume_with_a_longer_run_reshapes_the_schedule(tmp_path, name):
    """3 steps of a cosine to 0 (max_steps=3), resumed with max_steps=6: the schedule takes the new length, as if the
    run had been planned for 6 steps from the start (README, "Resuming a run"), instead of staying at 0."""
    data = torch.utils.data.DataLoader(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)), batch_size=4)
    optim, scheduler, lr = {"name": name, "lr": 1e-2}, {"name": "cosine", "min_lr_ratio": 0.0}, 1e-2

    def fit(steps, ckpt_path=None):
        probe = LrPerStep()
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[probe],
                            default_root_dir=str(tmp_path))
        trainer.fit(_Linear64(optim, scheduler), data, ckpt_path=ckpt_path)
        return trainer, probe.lrs

    first, lrs = fit(3)
    assert lrs == pytest.approx([lr * expected(s, "cosine", 0, 3, 0.0) for s in range(3)], rel=1e-6)
    assert float(first.optimizers[0].param_groups[0]["lr"]) == 0.0  # the old schedule's end
    first.save_checkpoint(tmp_path / "three.ckpt")

    resumed, lrs = fit(6, tmp_path / "three.ckpt")
    assert resumed.global_step == 6 and len(lrs) == 3
    assert lrs == pytest.approx([lr * expected(s, "cosine", 0, 6, 0.0) for s in (3, 4, 5)], rel=1e-6)
    assert lrs == pytest.approx([5e-3, 2.5e-3, lr * (1 + math.cos(5 * math.pi / 6)) / 2], rel=1e-6)
    assert all(x > 0 for x in lrs)
    assert isinstance(resumed.optimizers[0].param_groups[0]["lr"], torch.Tensor) == (name == "adamw_torch_8bit")


def test_resume_with_the_same_shape_leaves_the_restored_lr_alone():
    model = nn.Linear(4, 4)
    opt = lit_optim.build_optimizer(model, "adamw_torch", lr=1e-2)
    sched = build_scheduler(opt, {"name": "linear", "warmup_steps": 2}, total_steps=10)
    for _ in range(4):
        opt.step()
        sched.step()
    state, lr = sched.state_dict(), opt.param_groups[0]["lr"]
    again = build_scheduler(opt, {"name": "linear", "warmup_steps": 2}, total_steps=10)
    opt.param_groups[0]["lr"] = 123.0  # a marker (as if restored with the optimizer): only a reshape rewrites it
    again.load_state_dict(state)
    assert again.last_epoch == 4 and opt.param_groups[0]["lr"] == 123.0
    longer = build_scheduler(opt, {"name": "linear", "warmup_steps": 2}, total_steps=20)
    longer.load_state_dict(state)
    assert longer.total_steps == 20 and longer.last_epoch == 4
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * expected(4, "linear", 2, 20, 0.0)) != lr
