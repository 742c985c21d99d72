"""Optimizer-in-backward inside real Lightning runs: same results as the normal step (schedule and gradient
accumulation included), gradients released during backward, global_step / checkpoints / exact resume / state bytes /
grad_norm as in a normal run, and every combination it cannot honour refused before step 1."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from harness import TINY_MODEL, run_task
from lowrank_support import (
    LOWRANK_HP,
    GradProbe,
    MetricRecorder,
    assert_state_matches_theory,
    assert_trains_and_resumes,
    fit_must_fail,
)

import lit_optim
from lit_optim.errors import HyperparameterError, IncompatibleConfigError
from lit_optim.optimizers.in_backward import InBackwardOptimizer
from lit_optim.spec import CPU, GRAD_ACCUM
from lit_optim.task.module import LanguageModelTask
from lit_optim.task.tiny_lm import TinyLM

SCHEDULE = {"name": "cosine", "warmup_steps": 2}
N_PARAMS = 20  # trainable tensors of the tiny model


def params_of(module):
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("name, hp", [("adamw_torch", {}), ("galore_adamw", LOWRANK_HP)])
def test_in_backward_equals_the_normal_step_with_schedule_and_accumulation(name, hp):
    """Same data, same seed: stepping in backward must give the normal run's parameters, with a warmup+cosine
    schedule (the per-parameter optimizers see the scheduled LR) and 2-batch gradient accumulation (the step happens
    on the last micro-batch's backward)."""
    optim = {"name": name, "lr": 1e-2, **hp}
    normal, t_normal, losses_normal = run_task(optim, 4, scheduler=SCHEDULE, accumulate_grad_batches=2)
    inb, t_inb, losses_inb = run_task({**optim, "in_backward": True}, 4, scheduler=SCHEDULE,
                                      accumulate_grad_batches=2)
    assert isinstance(t_inb.optimizers[0], InBackwardOptimizer)
    assert t_inb.global_step == t_normal.global_step == 4
    assert t_inb.lr_scheduler_configs[0].scheduler.last_epoch == 4
    assert t_inb.optimizers[0].param_groups[0]["lr"] == pytest.approx(t_normal.optimizers[0].param_groups[0]["lr"])
    assert losses_inb == pytest.approx(losses_normal, abs=1e-5)
    for a, b in zip(normal.parameters(), inb.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_gradients_are_released_during_backward_and_grad_norm_is_logged():
    optim = {"name": "adamw_torch", "lr": 1e-2}
    probe_n, norms_n = GradProbe(), MetricRecorder("grad_norm")
    run_task(optim, 4, callbacks=[probe_n, norms_n])
    probe_i, norms_i = GradProbe(), MetricRecorder("grad_norm")
    _, trainer, _ = run_task({**optim, "in_backward": True}, 4, callbacks=[probe_i, norms_i])
    # Normal step: every gradient alive after backward; in backward: none left, at most one alive at a time.
    assert probe_n.grads_alive == [N_PARAMS] * 4 and probe_n.max_alive_in_backward == N_PARAMS
    assert probe_i.grads_alive == [0] * 4 and probe_i.max_alive_in_backward <= 1
    # The norm the in-backward optimizer measured before releasing each gradient is the normal run's global norm.
    assert norms_n.values == []  # nothing logs grad_norm for a normal optimizer: lit_optim does not invent one
    assert len(norms_i.values) == 4
    assert norms_i.values == pytest.approx(probe_n.norms, rel=1e-4)
    assert float(trainer.optimizers[0].last_grad_norm) == pytest.approx(probe_n.norms[-1], rel=1e-4)


LAYERWISE = {
    "galore_adamw_layerwise": LOWRANK_HP,
    "galore_adamw_8bit_layerwise": LOWRANK_HP,
    "galore_adafactor_layerwise": LOWRANK_HP,
    "apollo_adamw_layerwise": LOWRANK_HP,
    "apollo_mini_layerwise": {"update_proj_gap": 4},
}


@pytest.mark.parametrize("name", LAYERWISE)
def test_layerwise_name_trains_resumes_and_matches_theory(name, tmp_path):
    t1, _, _ = assert_trains_and_resumes({"name": name, "lr": 1e-2, **LAYERWISE[name]}, tmp_path)
    opt = t1.optimizers[0]
    assert isinstance(opt, InBackwardOptimizer)
    assert opt.param_groups[0]["base"] == name.removesuffix("_layerwise")
    assert all(p.grad is None for p in opt._params())
    assert_state_matches_theory(opt)


def test_in_backward_option_for_any_name_resumes_exactly(tmp_path):
    t1, _, _ = assert_trains_and_resumes({"name": "adamw_bnb_8bit", "lr": 1e-2, "in_backward": True}, tmp_path)
    opt = t1.optimizers[0]
    assert opt.lit_optim.spec.supports == frozenset({CPU, GRAD_ACCUM})
    # bitsandbytes' 8-bit state for large tensors, 32-bit for the embedding (Hugging Face's rule), per parameter.
    assert opt.state[t1.lightning_module.model.embed.weight]["state1"].dtype == torch.float32
    assert opt.state[t1.lightning_module.model.blocks[0].up.weight]["state1"].dtype == torch.uint8
    assert_state_matches_theory(opt)


def test_clip_per_param_norm_clips_each_gradient_before_it_steps():
    torch.manual_seed(0)
    model = TinyLM(**{k: v for k, v in TINY_MODEL.items() if k != "arch"})
    opt = lit_optim.build_optimizer(model, "sgd", lr=1.0, in_backward=True, clip_per_param_norm=1e-3)
    before = params_of(model)
    tokens = torch.randint(0, 256, (4, 17))
    opt.step(lambda: F.cross_entropy(model(tokens[:, :-1]).reshape(-1, 256), tokens[:, 1:].reshape(-1)).backward())
    moved = [float((p - b).norm()) for p, b in zip(model.parameters(), before)]
    assert max(moved) <= 1e-3 * (1 + 1e-4) and min(moved) > 0  # SGD with lr 1: each step is the clipped gradient
    assert float(opt.last_grad_norm) > 1e-2  # the logged norm is the one before clipping


def test_manual_backward_outside_the_window_still_steps_correctly():
    """A backward outside `step(closure)` (manual optimization's pattern) only accumulates; `step()` then steps every
    parameter that still holds a gradient -- the same result, without the memory saving."""
    tokens = torch.randint(0, 256, (4, 17))
    out = []
    for in_backward in (False, True):
        torch.manual_seed(0)
        model = TinyLM(**{k: v for k, v in TINY_MODEL.items() if k != "arch"})
        opt = lit_optim.build_optimizer(model, "adamw_torch", lr=1e-2, in_backward=in_backward)
        for _ in range(2):
            F.cross_entropy(model(tokens[:, :-1]).reshape(-1, 256), tokens[:, 1:].reshape(-1)).backward()
            opt.step()
            opt.zero_grad()
        out.append(params_of(model))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*out))


# --- refused before step 1 -----------------------------------------------------------------------------------------
def test_global_norm_clipping_is_refused_with_the_per_parameter_alternative(tmp_path):
    info = fit_must_fail({"name": "adamw_torch", "lr": 1e-2, "in_backward": True}, IncompatibleConfigError, tmp_path,
                         gradient_clip_val=1.0)
    assert "clip_per_param_norm" in str(info.value) and "global gradient norm" in str(info.value)


@pytest.mark.parametrize("name", ["galore_adamw_layerwise", "lomo"])
def test_layerwise_names_refuse_global_norm_clipping(name, tmp_path):
    fit_must_fail({"name": name, "lr": 1e-2}, IncompatibleConfigError, tmp_path, gradient_clip_val=1.0,
                  match="clip_per_param_norm")


def test_ddp_is_refused_with_the_reason(tmp_path):
    info = fit_must_fail({"name": "galore_adamw_layerwise", "lr": 1e-2}, IncompatibleConfigError, tmp_path,
                         strategy="ddp")
    assert "unreduced" in str(info.value) and "DDPStrategy" in str(info.value)


@pytest.mark.gpu
def test_fp16_grad_scaler_is_refused_with_the_reason(tmp_path):
    fit_must_fail({"name": "adamw_torch", "lr": 1e-2, "in_backward": True}, IncompatibleConfigError, tmp_path,
                  accelerator="gpu", precision="16-mixed", match="GradScaler")


def test_invalid_in_backward_requests_fail_when_the_module_is_built(tmp_path):
    from harness import make_module

    with pytest.raises(HyperparameterError, match="schedule-free"):
        make_module({"name": "schedule_free_adamw", "in_backward": True})
    with pytest.raises(HyperparameterError, match="always steps in backward"):
        make_module({"name": "galore_adamw_layerwise", "in_backward": False})
    with pytest.raises(HyperparameterError, match="clip_per_param_norm"):
        make_module({"name": "adamw_torch", "clip_per_param_norm": 1.0})  # only with in_backward
    with pytest.raises(HyperparameterError, match="positive"):
        make_module({"name": "adamw_torch", "in_backward": True, "clip_per_param_norm": -1})
    make_module({"name": "galore_adamw_layerwise", "in_backward": True})  # redundant, accepted


class ManualTask(LanguageModelTask):
    """Manual optimization, the in-backward way: backward runs inside `opt.step(closure)`."""

    def __init__(self, optim) -> None:
        super().__init__(model=TINY_MODEL, optim=optim)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = self._loss(batch)
        opt.step(closure=lambda: self.manual_backward(loss))
        opt.zero_grad()
        self.log("train/loss", loss)
        return loss


def test_manual_optimization_steps_in_backward_and_advances_global_step():
    import lightning as L
    from harness import make_data

    L.seed_everything(0, verbose=False)
    module, probe = ManualTask({"name": "adamw_torch", "lr": 1e-2, "in_backward": True}), GradProbe()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[probe])
    trainer.fit(module, make_data())
    assert trainer.global_step == 3
    assert probe.grads_alive == [0] * 3 and probe.max_alive_in_backward <= 1


@pytest.mark.parametrize("hp", [{}, {"in_backward": True}, {"offload": "cpu"}])
def test_users_global_bnb_override_reaches_every_wrapper(hp, monkeypatch):
    """bitsandbytes' own way to keep a tensor at 32-bit state (GlobalOptimManager.override_config) is honoured by
    adamw_8bit plain, stepping in backward and offloaded alike: every bnb optimizer gets one kind of private manager,
    carrying the user's overrides."""
    import bitsandbytes as bnb

    shared = bnb.optim.GlobalOptimManager.get_instance()
    monkeypatch.setattr(shared, "pid2config", dict(shared.pid2config))
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 128))
    shared.override_config(model[0].weight, "optim_bits", 32)
    opt = lit_optim.build_optimizer(model, "adamw_8bit", lr=1e-3, **hp)
    with opt.stepping() if hp.get("in_backward") else contextlib.nullcontext():
        model(torch.randn(4, 128)).square().mean().backward()
    opt.step()
    assert opt.state[model[0].weight]["state1"].dtype == torch.float32  # the user's override
    assert opt.state[model[1].weight]["state1"].dtype == torch.uint8  # the name's 8 bits elsewhere
