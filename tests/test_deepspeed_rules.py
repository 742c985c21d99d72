"""Lightning's DeepSpeedStrategy is refused before anything is built: DeepSpeed swaps the optimizer for its own
ZeRO/bf16 optimizer over flat fp32 master partitions, so lit_optim's shape-based state, schedule-free's train/eval
switch, and its checks, callbacks and resume would all miss. DeepSpeed itself needs CUDA and is not installed here;
the refusal reads only the strategy's type, so the stand-in Trainer holds a real DeepSpeedStrategy made without its
constructor (which imports deepspeed).

A user who drives DeepSpeed by hand may still call `lit_optim.build_optimizer` under ZeRO-3, whose parameters are
empty at build time: the weight-decay grouping reads their shape from `ds_shape`."""

from __future__ import annotations

import pytest
import torch
from harness import TINY_MODEL, stand_in_trainer

from lit_optim.errors import IncompatibleConfigError
from lit_optim.param_groups import build_param_groups
from lit_optim.task.module import LanguageModelTask


def deepspeed_trainer():
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return stand_in_trainer(DeepSpeedStrategy.__new__(DeepSpeedStrategy))


OPTIMS = [{"name": "adamw_torch"}, {"name": "schedule_free_adamw"}, {"name": "muon"}, {"name": "adamw_fused_8bit"},
          {"name": "adamw_torch", "offload": "cpu"}, {"name": "adamw_torch", "in_backward": True}]


@pytest.mark.parametrize("optim", OPTIMS, ids=lambda o: "-".join(map(str, o.values())))
def test_deepspeed_is_refused_before_the_optimizer_is_built(optim, monkeypatch):
    import lit_optim.mixin

    def never(*args, **kwargs):
        raise AssertionError("built before the strategy was checked")

    monkeypatch.setattr(lit_optim.mixin, "build_optimizer", never)
    module = LanguageModelTask(model=TINY_MODEL, optim={"lr": 1e-2, **optim})
    module._trainer = deepspeed_trainer()
    module.configure_model()
    with pytest.raises(IncompatibleConfigError) as err:
        module.configure_optimizers()
    msg = str(err.value)
    assert "does not support Lightning's DeepSpeedStrategy" in msg and "flat 1-D partitions" in msg, msg
    assert "trainer=fsdp2" in msg and "or DDP" in msg, msg


def test_zero3_partitions_keep_their_weight_decay():
    """ZeRO-3 builds the model partitioned: each parameter's data is empty, its whole shape in `ds_shape`."""
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    for p in net.parameters():
        p.ds_shape, p.ds_numel = p.shape, p.numel()
        p.data = torch.empty(0)
    plan = build_param_groups(net, lr=1e-3, weight_decay=0.1)
    assert {i.name for i in plan.param_info.values() if i.decay} == {"0.weight"}, plan.summary()
    assert plan.summary().startswith("88 trainable params in 2 groups -- decay: 64 params in 1 tensors"), plan.summary()
