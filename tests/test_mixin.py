"""`OptimizerMixin` in a user's LightningModule: a few lines to adopt, no Hydra needed, checkpoints that load with
`weights_only=True`, schedule-free optimizers switched between train and eval, and Hydra configs accepted as-is."""

from __future__ import annotations

import glob
import textwrap

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from harness import TINY_MODEL, make_data, python_without
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_optim import OptimizerMixin
from lit_optim.errors import HyperparameterError
from lit_optim.lifecycle import OptimizerLifecycle
from lit_optim.plain_state import MARK

# The whole adoption, as a user writes it: the base class, the two arguments, and no configure_optimizers.
USER_MODULE = '''
class Regressor(OptimizerMixin, L.LightningModule):
    def __init__(self, optim="adamw_torch", scheduler=None):
        super().__init__(optim=optim, scheduler=scheduler)
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, 64, bias=False), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 64))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)
'''
exec(USER_MODULE)  # defines Regressor here exactly as the text reads


def regression_data(n: int = 256) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 64, generator=g)
    y = x @ torch.randn(64, 64, generator=g) * 0.1
    return DataLoader(TensorDataset(x, y), batch_size=16)


class Losses(Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(outputs["loss"]))


def trainer(tmp_path, steps, *callbacks, **kw) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
                     callbacks=list(callbacks), **kw)


def test_user_module_adopts_the_mixin_and_checkpoints_load_weights_only(tmp_path):
    assert "def configure_optimizers" not in USER_MODULE and len(USER_MODULE.strip().splitlines()) <= 10
    optim = {"name": "adamw_torch_8bit", "lr": 1e-2, "weight_decay": 0.05}
    scheduler = {"name": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1}
    losses = Losses()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=8, save_top_k=-1, filename="{step}")
    t = trainer(tmp_path, 16, losses, ckpt)
    module = Regressor(optim=optim, scheduler=scheduler)
    t.fit(module, regression_data())

    opt = t.optimizers[0]
    assert type(opt).__name__ == "AdamW8bit" and opt.lit_optim.name == "adamw_torch_8bit"
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"decay", "no_decay"}
    assert len(groups["no_decay"]["params"]) == 3  # LayerNorm weight and bias, output bias
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0
    assert any(isinstance(cb, OptimizerLifecycle) for cb in t.callbacks)
    assert sum(losses.values[-3:]) < 0.8 * sum(losses.values[:3]), losses.values
    # The cosine schedule ran to its floor: 1e-2 * 0.1.
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(1e-3, rel=1e-5)

    # Plain torch.load with weights_only=True, as torch >= 2.6 does by default: torchao's state is in the file as
    # plain tensors (lit_optim/plain_state.py), so no class needs registering first.
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.ckpt")) == ["step=16.ckpt", "step=8.ckpt"]
    last = str(tmp_path / "ckpt" / "step=16.ckpt")
    checkpoint = torch.load(last, weights_only=True, map_location="cpu")
    assert checkpoint["hyper_parameters"]["optim"] == optim
    saved = checkpoint["optimizer_states"][0]
    assert [g["name"] for g in saved["param_groups"]] == ["decay", "no_decay"]
    assert next(iter(saved["state"].values()))["exp_avg"][MARK].endswith(":OptimState8bit")
    assert checkpoint["lr_schedulers"][0]["last_epoch"] == 16

    # And the module resumes from it through Lightning with weights_only=True.
    t2 = trainer(tmp_path / "resume", 20)
    t2.fit(Regressor(optim=optim, scheduler=scheduler), regression_data(), ckpt_path=last, weights_only=True)
    assert t2.global_step == 20


def test_mixin_without_hydra_installed(tmp_path):
    """A fresh interpreter in which hydra and omegaconf do not exist at all."""
    code = textwrap.dedent("""
        import sys, glob, torch
        import lightning as L
        import torch.nn.functional as F
        from torch import nn
        from torch.utils.data import DataLoader, TensorDataset
        from lightning.pytorch.callbacks import ModelCheckpoint
        from lit_optim import OptimizerMixin
        for missing in ("hydra", "omegaconf"):
            try:
                __import__(missing)
                raise SystemExit(missing + " is importable")
            except ImportError:
                pass
    """) + USER_MODULE + textwrap.dedent("""
        x = torch.randn(64, 64); y = x * 0.5
        trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=".",
                            callbacks=[ModelCheckpoint(dirpath="ckpt", every_n_train_steps=4)])
        trainer.fit(Regressor(optim={"name": "adamw_bnb_8bit", "lr": 1e-3, "betas": [0.9, 0.95]},
                              scheduler={"name": "linear", "warmup_steps": 1}),
                    DataLoader(TensorDataset(x, y), batch_size=8))
        ckpt = torch.load(glob.glob("ckpt/*.ckpt")[0], weights_only=True)
        print("OK", trainer.global_step, type(trainer.optimizers[0]).__name__,
              ckpt["optimizer_states"][0]["param_groups"][0]["betas"], "hydra" in sys.modules)
    """)
    result = python_without(("hydra", "hydra_core", "omegaconf"), code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK 4 AdamW8bit (0.9, 0.95) False" in result.stdout


class ModeProbe(Callback):
    """Records the schedule-free optimizer's mode and a weight around validation."""

    def __init__(self) -> None:
        self.events: list[tuple[str, bool]] = []
        self.checks: list[tuple[torch.Tensor, torch.Tensor]] = []  # (expected eval weight, weight seen in val)
        self.restored: list[tuple[torch.Tensor, torch.Tensor]] = []  # (train weight before val, after val)
        self._y = self._z = None
        self._validated = False

    @staticmethod
    def _mode(trainer) -> bool:
        modes = {g["train_mode"] for g in trainer.optimizers[0].param_groups}
        assert len(modes) == 1
        return modes.pop()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.events.append(("train", self._mode(trainer)))
        if self._validated:
            self.restored.append((self._y, pl_module.model.lm_head.weight.detach().clone()))
            self._validated = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        opt = trainer.optimizers[0]
        w = pl_module.model.lm_head.weight
        group = next(g for g in opt.param_groups if any(p is w for p in g["params"]))
        beta1 = group["betas"][0] if "betas" in group else group["momentum"]  # SGDScheduleFree: momentum
        self._y, self._z, self._beta1 = w.detach().clone(), opt.state[w]["z"].clone(), beta1

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.events.append(("val", self._mode(trainer)))
        self._validated = True
        x = self._y.lerp(self._z, 1 - 1 / self._beta1)  # schedule-free's evaluation point x from y and z
        self.checks.append((x, pl_module.model.lm_head.weight.detach().clone()))


@pytest.mark.parametrize("name", ["schedule_free_adamw", "schedule_free_sgd"])
def test_schedule_free_switches_train_and_eval(name, tmp_path):
    from lit_optim.task.module import LanguageModelTask

    probe = ModeProbe()
    t = trainer(tmp_path, 4, probe, val_check_interval=2, limit_val_batches=1, enable_checkpointing=False)
    module = LanguageModelTask(model=TINY_MODEL, optim={"name": name, "lr": 1e-2})
    t.fit(module, make_data())

    assert probe.events == [("train", True), ("train", True), ("val", False),
                            ("train", True), ("train", True), ("val", False)]
    assert len(probe.checks) == 2 and len(probe.restored) == 1
    for x, seen in probe.checks:  # validation saw x, not the training point y
        torch.testing.assert_close(seen, x, rtol=0, atol=1e-6)
    for y, after in probe.restored:  # training continued from y after validation
        torch.testing.assert_close(after, y, rtol=0, atol=1e-6)
        assert not torch.allclose(probe.checks[0][0], y, atol=1e-6)
    assert not t.optimizers[0].param_groups[0]["train_mode"]  # fit ends in eval mode: the weights to keep are x


def test_schedule_free_warns_about_decaying_schedules():
    from lit_optim.task.module import LanguageModelTask

    with pytest.warns(UserWarning, match="schedule-free: a decaying LR schedule works against it"):
        LanguageModelTask(model=TINY_MODEL, optim="schedule_free_adamw", scheduler={"name": "cosine"})


def test_hydra_dictconfig_as_optim(tmp_path):
    """Hydra's instantiate with its default _convert_ hands the module DictConfig / ListConfig nodes."""
    import hydra.utils
    from omegaconf import DictConfig, OmegaConf

    cfg = OmegaConf.create({
        "_target_": "lit_optim.task.module.LanguageModelTask",
        "model": TINY_MODEL,
        "optim": {"name": "adamw_bnb_8bit", "lr": 1e-2, "betas": [0.9, 0.95], "lr_scales": {"embedding": 0.5}},
        "scheduler": {"name": "linear", "warmup_steps": 1},
    })
    module = hydra.utils.instantiate(cfg)
    assert module.optim_config == {"name": "adamw_bnb_8bit", "lr": 1e-2, "betas": (0.9, 0.95),
                                   "lr_scales": {"embedding": 0.5}}
    assert not isinstance(module.hparams["optim"], DictConfig)

    t = trainer(tmp_path, 2, ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2),
                limit_val_batches=0)
    t.fit(module, make_data())
    opt = t.optimizers[0]
    assert {g["name"] for g in opt.param_groups} == {"decay", "no_decay", "embedding/decay"}
    assert all(g["betas"] == (0.9, 0.95) and type(g["betas"]) is tuple for g in opt.param_groups)
    path = glob.glob(str(tmp_path / "ckpt" / "*.ckpt"))[0]
    checkpoint = torch.load(path, weights_only=True, map_location="cpu")  # no OmegaConf objects inside
    assert checkpoint["hyper_parameters"]["optim"]["betas"] == (0.9, 0.95)
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["betas"] == (0.9, 0.95)


def test_configure_optimizers_without_a_trainer():
    module = Regressor(optim={"name": "lion_32bit", "lr": 1e-4})
    opt = module.configure_optimizers()
    assert type(opt).__name__ == "Lion32bit" and opt.param_groups[0]["lr"] == 1e-4


class GradsAtBatchStart(Callback):
    """Whether any gradient is alive when each training batch starts, before its forward pass."""

    def __init__(self) -> None:
        self.alive: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.alive.append(any(p.grad is not None for p in pl_module.parameters()))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_gradients_are_released_after_each_step_without_changing_training(accumulate):
    # Lightning zeroes gradients only in the next step's closure, after its forward: the mixin frees them before it.
    # With accumulation they must survive the micro-batches between steps, and training must be bit-identical.
    def fit(release: bool, module_cls=Regressor):
        L.seed_everything(0, verbose=False)
        module = module_cls(optim={"name": "adamw_torch", "lr": 1e-2})
        module.release_grads_after_step = release
        probe = GradsAtBatchStart()
        L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, accumulate_grad_batches=accumulate, callbacks=[probe]).fit(
            module, regression_data())
        return module, probe.alive

    released, alive = fit(True)
    kept, alive_kept = fit(False)
    stepped_before = [False] + [i % accumulate == 0 for i in range(1, len(alive))]  # did batch i-1 end a window?
    assert alive == [i > 0 and not s for i, s in enumerate(stepped_before)]
    assert alive_kept == [i > 0 for i in range(len(alive_kept))]
    assert all(torch.equal(a, b) for a, b in zip(released.parameters(), kept.parameters()))

    class OwnZeroGrad(Regressor):
        def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
            optimizer.zero_grad(set_to_none=False)  # e.g. fixed gradient buffers for CUDA graphs: left alone

    _, alive_own = fit(True, OwnZeroGrad)
    assert alive_own == alive_kept

    class Manual(Regressor):
        # Manual optimization owns its zeroing: here it never zeroes, and nothing may do it behind its back.
        def __init__(self, **kw):
            super().__init__(**kw)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.manual_backward(loss)
            self.optimizers().step()

    if accumulate == 1:  # Lightning refuses its accumulation under manual optimization
        _, alive_manual = fit(True, Manual)
        assert alive_manual == alive_kept


def test_release_grads_after_step_is_a_constructor_option():
    from lit_optim.task.module import LanguageModelTask

    assert Regressor().release_grads_after_step is True
    task = LanguageModelTask(model=dict(TINY_MODEL), release_grads_after_step=False)
    assert task.release_grads_after_step is False and task.hparams.release_grads_after_step is False
    with pytest.raises(HyperparameterError, match="release_grads_after_step must be True or False; got 'no'"):
        LanguageModelTask(model=dict(TINY_MODEL), release_grads_after_step="no")
