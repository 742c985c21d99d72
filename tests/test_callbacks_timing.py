"""StepTimingMonitor against known durations: a training step, an optimizer step and a data loader that sleep for
set times, so each logged segment has a floor it must reach and a ceiling it must stay under."""

from __future__ import annotations

import time

import lightning as L
import pytest
import torch
from callbacks_support import read_csv, values
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from lit_optim.callbacks import StepTimingMonitor

FWD_S, OPT_S, FIRST_OPT_S, DATA_S = 0.060, 0.020, 0.300, 0.010
SLACK_MS = 30.0  # sleeps overshoot on a loaded machine; they never undershoot. Below FWD_S: the closure
# (forward) counted in the optimizer step would show.


def slow_collate(items):
    time.sleep(DATA_S)
    return torch.stack(items)


class SleepySGD(torch.optim.SGD):
    """Torch's SGD whose update takes OPT_S (FIRST_OPT_S the first time); calls its hooked parent's step inside."""

    def __init__(self, params, lr):
        torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)  # makes SGD.step itself hooked: nested hook calls
        super().__init__(params, lr=lr)
        self.calls = 0

    def step(self, closure=None):
        loss = super().step(closure)  # Lightning's closure (forward + backward) runs in here
        time.sleep(FIRST_OPT_S if self.calls == 0 else OPT_S)
        self.calls += 1
        return loss


class NoInitOptimizer(torch.optim.Optimizer):
    """Like torchao's CPUOffloadOptimizer: never runs Optimizer.__init__, so it has no step-hook registry."""

    def __init__(self, params, lr):
        self.inner = torch.optim.SGD(params, lr=lr)
        self.calls = 0

    param_groups = property(lambda self: self.inner.param_groups)
    state = property(lambda self: self.inner.state)
    defaults = property(lambda self: self.inner.defaults)

    def step(self, closure=None):
        loss = self.inner.step(closure)
        time.sleep(FIRST_OPT_S if self.calls == 0 else OPT_S)
        self.calls += 1
        return loss

    def zero_grad(self, set_to_none=True):
        self.inner.zero_grad(set_to_none)

    def state_dict(self):
        return self.inner.state_dict()


class Sleepy(L.LightningModule):
    def __init__(self, optimizer_cls):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.optimizer_cls = optimizer_cls

    def training_step(self, batch, batch_idx):
        time.sleep(FWD_S)
        return self.lin(batch).pow(2).mean()

    def configure_optimizers(self):
        return self.optimizer_cls(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(list(torch.randn(64, 4)), batch_size=2, collate_fn=slow_collate)


@pytest.mark.parametrize("optimizer_cls", [SleepySGD, NoInitOptimizer])
def test_segments_match_known_durations(tmp_path, optimizer_cls):
    monitor = StepTimingMonitor(log_every_n_steps=3, warmup_steps=2)
    trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=CSVLogger(str(tmp_path)), log_every_n_steps=3,
                        callbacks=[monitor], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    module = Sleepy(optimizer_cls)
    trainer.fit(module)
    rows = read_csv(trainer)

    # Warm-up: the first two steps, reported once and on their own.
    warm = next(r for r in rows if "timing/warmup/steps" in r)
    assert warm["timing/warmup/steps"] == 2
    assert 1000 * FIRST_OPT_S <= warm["timing/warmup/first_optimizer_step_ms"] <= 1000 * FIRST_OPT_S + SLACK_MS
    assert warm["timing/warmup/optimizer_step_ms"] >= 1000 * (FIRST_OPT_S + OPT_S) / 2
    assert warm["timing/warmup/first_train_step_ms"] >= 1000 * (FWD_S + FIRST_OPT_S)

    # Steady intervals (Lightning steps 2 and 5, and the rest at the end of training): the first step never counted.
    steps = values(rows, "timing/steps")
    assert [s for s, _ in steps] == [2, 5, 7] and [n for _, n in steps] == [1, 3, 2]
    for r in (r for r in rows if "timing/optimizer_step_ms" in r):
        opt, fwd, train = r["timing/optimizer_step_ms"], r["timing/forward_backward_ms"], r["timing/train_step_ms"]
        assert 1000 * OPT_S <= opt <= 1000 * OPT_S + SLACK_MS  # the update alone, not the closure inside step()
        assert r["timing/optimizer_step_ms_max"] >= opt
        assert 1000 * FWD_S <= fwd <= 1000 * FWD_S + SLACK_MS  # training_step + backward, run by the closure
        assert fwd + opt <= train <= fwd + opt + SLACK_MS
        assert r["timing/optimizer_step_share"] == pytest.approx(opt / train, rel=0.02)
        if "timing/data_wait_ms" in r:
            assert 1000 * DATA_S <= r["timing/data_wait_ms"] <= 1000 * DATA_S + SLACK_MS
    assert any("timing/data_wait_ms" in r for r in rows)

    # Instrumentation is gone after training: no hooks left, the instance's step restored.
    opt = trainer.optimizers[0]
    if isinstance(opt, SleepySGD):
        assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    else:
        assert "step" not in vars(opt)
    assert opt.calls == 8
