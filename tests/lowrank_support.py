"""Helpers for the GaLore / APOLLO / Adam-mini / in-backward / LOMO tests (on top of tests/harness.py)."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from harness import make_data, make_module, run_task, states_equal
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import lit_optim
from lit_optim.state_bytes import state_bytes_by_param
from lit_optim.state_theory import expected_state_bytes

SCALAR_SLACK = 16  # bytes per parameter the theory leaves out (a `step` tensor, APOLLO's limiter scalar)
BNB_QMAPS = 2 * 256 * 4  # bitsandbytes' two shared quantization maps, counted once per optimizer

# Small ranks and a short projector refresh: an 8-step test refreshes the projection at step 4, where it resumes.
LOWRANK_HP = {"rank": 16, "update_proj_gap": 4}


def resume_run(optim: dict[str, Any], tmp_path: Path, steps: int = 8, **kw):
    """Train `steps` straight (checkpoint half-way), then resume from that checkpoint and train to `steps`.

    Returns (straight trainer, resumed trainer, losses of the straight run, params equal, optimizer state equal).
    """
    straight, t1, losses = run_task(optim, steps, tmp_path=tmp_path, checkpoint_every=steps // 2, **kw)
    ckpt = glob.glob(str(tmp_path / "ckpt" / f"step={steps // 2}.ckpt"))
    assert ckpt, f"no checkpoint at step {steps // 2}"
    resumed, t2, _ = run_task(optim, steps, tmp_path=tmp_path / "resumed", ckpt_path=ckpt[0], **kw)
    params_equal = all(torch.equal(x, y) for x, y in zip(straight.parameters(), resumed.parameters()))
    return t1, t2, losses, params_equal, states_equal(t1.optimizers[0], t2.optimizers[0])


def assert_trains_and_resumes(optim: dict[str, Any], tmp_path: Path, steps: int = 8, drop: float = 0.3, **kw):
    t1, t2, losses, params_equal, state_equal = resume_run(optim, tmp_path, steps, **kw)
    name = optim["name"]
    assert t1.global_step == steps and t2.global_step == steps
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - drop, f"{name}: loss did not fall: {[round(x, 3) for x in losses]}"
    assert params_equal, f"{name}: parameters after resume differ from the uninterrupted run"
    assert state_equal, f"{name}: optimizer state after resume differs from the uninterrupted run"
    return t1, t2, losses


def assert_state_matches_theory(optimizer, rel: float = 0.01) -> dict:
    measured = state_bytes_by_param(optimizer)
    assert measured, "no parameters"
    total_expected = 0.0
    for p, got in measured.items():
        want = expected_state_bytes(optimizer, p)
        total_expected += want
        assert abs(got - want) <= rel * want + SCALAR_SLACK + BNB_QMAPS, (tuple(p.shape), got, want)
    total = sum(measured.values())
    assert abs(total - total_expected) <= rel * total_expected + SCALAR_SLACK * len(measured) + BNB_QMAPS, \
        (total, total_expected)
    return measured


class CkptDir:
    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "ckpt"

    def files(self) -> list[str]:
        return sorted(glob.glob(str(self.path / "*.ckpt")))


def fit_must_fail(optim: dict[str, Any] | None, exc: type[BaseException], tmp_path: Path, *, module=None,
                  match: str | None = None, **trainer_kw) -> pytest.ExceptionInfo:
    """A real `Trainer.fit` that must fail before step 1: no optimizer step taken, no checkpoint written."""
    import os

    L.seed_everything(0, verbose=False)
    module = module if module is not None else make_module(optim)
    ckpt = CkptDir(tmp_path)
    environ = dict(os.environ)  # Lightning's DDP setup writes MASTER_PORT etc. into this process's environment
    trainer = L.Trainer(
        max_steps=4, accelerator=trainer_kw.pop("accelerator", "cpu"), devices=trainer_kw.pop("devices", 1),
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[ModelCheckpoint(dirpath=str(ckpt.path), every_n_train_steps=1, save_top_k=-1)], **trainer_kw,
    )
    try:
        with pytest.raises(exc, match=match) as info:
            trainer.fit(module, make_data())
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()  # later subprocesses must not inherit a port this process may still hold
        os.environ.update(environ)
    assert trainer.global_step == 0, f"the error came after {trainer.global_step} optimizer steps"
    assert ckpt.files() == [], f"a checkpoint was written: {ckpt.files()}"
    return info


class GradProbe(Callback):
    """Records, at `on_before_optimizer_step` (after backward), which parameters still hold a gradient, the global
    gradient norm of those that do, and, during backward, the most gradients alive at once."""

    def __init__(self) -> None:
        self.grads_alive: list[int] = []
        self.norms: list[float] = []
        self.max_alive_in_backward = 0
        self._handles = []

    def on_train_start(self, trainer, pl_module) -> None:
        params = [p for p in pl_module.parameters() if p.requires_grad]

        def hook(_p):
            alive = sum(q.grad is not None for q in params)
            self.max_alive_in_backward = max(self.max_alive_in_backward, alive)

        self._handles = [p.register_post_accumulate_grad_hook(hook) for p in params]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.grads_alive.append(len(grads))
        if grads:
            self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    def on_train_end(self, trainer, pl_module) -> None:
        for h in self._handles:
            h.remove()


class MetricRecorder(Callback):
    """Logged metrics after every batch (read at the next batch start, after all callbacks have logged)."""

    def __init__(self, key: str) -> None:
        self.key, self.values = key, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.key in trainer.callback_metrics:
            self.values.append(float(trainer.callback_metrics[self.key]))

    def on_train_end(self, trainer, pl_module) -> None:
        if self.key in trainer.callback_metrics:
            self.values.append(float(trainer.callback_metrics[self.key]))


def spec(name: str):
    return lit_optim.get_spec(name)
