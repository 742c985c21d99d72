"""The mixin cannot be bypassed silently (base order, a module's own configure_optimizers / configure_callbacks, a
forgotten optim=), and Lightning's LR finder works with it, float and torchao tensor learning rates alike."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, LearningRateFinder
from lightning.pytorch.tuner import Tuner
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lit_optim
from lit_optim import OptimizerMixin
from lit_optim.errors import LitOptimError, MixinUsageError
from lit_optim.lifecycle import OptimizerLifecycle


class Net(OptimizerMixin, L.LightningModule):
    def __init__(self, optim=None, scheduler=None):
        super().__init__(optim=optim, scheduler=scheduler)
        self.save_hyperparameters()
        self.net = nn.Linear(64, 64)  # a shape torchao's step is already compiled for in the other tests

    def training_step(self, batch, batch_idx):
        return F.mse_loss(self.net(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.mse_loss(self.net(batch[0]), batch[1]))


def data(n: int = 128) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 64, generator=g)
    return DataLoader(TensorDataset(x, x @ torch.randn(64, 64, generator=g) * 0.1), batch_size=8)


def trainer(tmp_path, steps: int, *callbacks, **kw) -> L.Trainer:
    kw = {"logger": False, "enable_checkpointing": False, "limit_val_batches": 0, **kw}
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
                     callbacks=list(callbacks), **kw)


class Steps(Callback):
    def __init__(self) -> None:
        self.count = 0

    def on_train_batch_start(self, *args) -> None:
        self.count += 1


# --- configure_optimizers ----------------------------------------------------------------------------------------


class OwnSGD(Net):
    def configure_optimizers(self):  # the pre-adoption method, left in place
        return torch.optim.SGD(self.parameters(), lr=0.1)


class OwnOtherName(Net):
    def configure_optimizers(self):
        return lit_optim.build_optimizer(self, "sgd", lr=0.1)


@pytest.mark.parametrize("cls, got", [(OwnSGD, "returned SGD"), (OwnOtherName, "returned 'sgd'")])
def test_own_configure_optimizers_is_refused_before_step_1(tmp_path, cls, got):
    steps = Steps()
    t = trainer(tmp_path, 2, steps)
    with pytest.raises(MixinUsageError) as info:
        t.fit(cls(optim="adamw_8bit"), data())
    message = str(info.value)
    assert steps.count == 0 and "\n" not in message
    assert f"{cls.__name__}.configure_optimizers {got}, not the 'adamw_8bit' that optim= asks for" in message
    assert "delete it, or return super().configure_optimizers()" in message


class SuperWithPlateau(Net):
    """The supported override: super()'s optimizer (scheduler=None), with a scheduler of the module's own."""

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": plateau, "monitor": "val_loss"}}


class SuperWithSchedule(Net):
    def configure_optimizers(self):
        return super().configure_optimizers()


def test_configure_optimizers_that_calls_super_keeps_working(tmp_path):
    t = trainer(tmp_path, 4, limit_val_batches=1, val_check_interval=2)
    t.fit(SuperWithPlateau(optim={"name": "adamw_bnb_8bit", "lr": 1e-3}), data(), data(16))
    assert t.global_step == 4 and t.optimizers[0].lit_optim.spec.name == "adamw_bnb_8bit"
    assert type(t.lr_scheduler_configs[0].scheduler).__name__ == "ReduceLROnPlateau"

    t = trainer(tmp_path, 4)
    t.fit(SuperWithSchedule(optim="adamw_torch", scheduler={"name": "linear"}), data())
    assert t.global_step == 4 and type(t.lr_scheduler_configs[0].scheduler).__name__ == "WarmupSchedule"


# --- configure_callbacks -----------------------------------------------------------------------------------------


class Marker(Callback):
    pass


class OwnCallbacks(Net):
    def configure_callbacks(self):  # no super(): lit_optim's lifecycle callback is added all the same
        return [Marker()]


class OwnCallbacksWithSuper(Net):
    def configure_callbacks(self):
        return [*super().configure_callbacks(), Marker()]


class OwnSingleCallback(OwnCallbacksWithSuper):
    def configure_callbacks(self):  # a bare callback, not a list, and no super() one level down
        return Marker()


@pytest.mark.parametrize("cls", [OwnCallbacks, OwnCallbacksWithSuper, OwnSingleCallback])
def test_own_configure_callbacks_keeps_the_lifecycle_callback(tmp_path, cls):
    # Schedule-free needs it most: without it, step 1 fails with "Optimizer was not in train mode".
    pytest.importorskip("schedulefree")
    t = trainer(tmp_path, 4, limit_val_batches=1, val_check_interval=2)
    t.fit(cls(optim={"name": "schedule_free_adamw", "lr": 1e-3}), data(), data(16))
    assert t.global_step == 4
    assert sum(isinstance(c, OptimizerLifecycle) for c in t.callbacks) == 1
    assert sum(isinstance(c, Marker) for c in t.callbacks) == 1
    assert not t.optimizers[0].param_groups[0]["train_mode"]  # the lifecycle callback put it in eval at the end


# --- base order and the default optimizer ------------------------------------------------------------------------


def test_mixin_after_lightning_module_is_refused_when_the_class_is_defined():
    with pytest.raises(MixinUsageError) as info:
        class Late(L.LightningModule, OptimizerMixin):
            pass
    assert "put OptimizerMixin before LightningModule in the bases, as in `class Late(OptimizerMixin, " \
           "L.LightningModule)`" in str(info.value)
    assert isinstance(info.value, (LitOptimError, TypeError))


def test_missing_optim_trains_the_default_and_says_so_once_per_class():
    class Forgot(OptimizerMixin, L.LightningModule):
        def __init__(self, optim="adamw_8bit"):
            super().__init__()  # optim= forgotten

    with pytest.warns(UserWarning, match=r"Forgot: no optim= reached OptimizerMixin.__init__, so it trains "
                                         r"adamw_torch \(lr=0.001\). Choose with super\(\).__init__\(optim="):
        module = Forgot()
    assert module.optim_config == {"name": "adamw_torch"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Forgot()  # said once for the class
        Net(optim="adamw_torch")  # chosen: nothing to say


def test_lr_property_reads_and_writes_the_optim_config():
    module = Net(optim="adamw_torch")
    assert module.lr == 1e-3  # the optimizer's default
    module.lr = 3e-4
    assert module.optim_config == {"name": "adamw_torch", "lr": 3e-4}
    assert module.hparams.optim == {"name": "adamw_torch", "lr": 3e-4}
    assert module.configure_optimizers().param_groups[0]["lr"] == 3e-4


# --- Lightning's LR finder ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adamw_torch", "adamw_torch_8bit"])
@pytest.mark.parametrize("update_attr", [False, True])
def test_lr_finder(tmp_path, name, update_attr):
    module = Net(optim={"name": name, "lr": 1e-3})
    t = trainer(tmp_path, 30)
    finder = Tuner(t).lr_find(module, data(), num_training=20, early_stop_threshold=None, update_attr=update_attr)
    suggestion = finder.suggestion()
    assert len(finder.results["lr"]) == 20 and suggestion is not None
    assert module.lr == (suggestion if update_attr else 1e-3)
    assert module.hparams.optim["lr"] == module.lr

    t = trainer(tmp_path, 3)
    t.fit(module, data())  # trains with the found LR
    assert t.global_step == 3 and float(t.optimizers[0].param_groups[0]["lr"]) == pytest.approx(module.lr)


def test_lr_finder_callback_inside_a_fit_with_torchao(tmp_path):
    # The callback writes its suggestion into the live optimizer as a float, then training goes on with it.
    t = trainer(tmp_path, 24, LearningRateFinder(num_training_steps=20, early_stop_threshold=None, update_attr=True))
    module = Net(optim={"name": "adamw_torch_8bit", "lr": 1e-3})
    t.fit(module, data())
    lr = t.optimizers[0].param_groups[0]["lr"]
    assert t.global_step == 24 and isinstance(lr, torch.Tensor)  # torchao's compiled step reads a tensor
    assert float(lr) == pytest.approx(module.lr) and module.lr != 1e-3
