"""Lightning's DeepSpeedStrategy: ZeRO (and DeepSpeed's bf16/fp16 optimizers) step flat 1-D partitions of the
parameters, as FSDP1 does, so exactly the names allowed under FSDP1 are allowed under DeepSpeed, and every other one
is refused before step 1 by the module's own `configure_optimizers`. Muon, for one, would otherwise fail at step 1
under ZeRO-1/2 and, under ZeRO-3 (parameters emptied at build), send every weight to its AdamW part without a word.

DeepSpeed needs CUDA and is not installed here; the checks read only the strategy's type, so the stand-in Trainer
holds a real DeepSpeedStrategy made without its constructor (which imports deepspeed). Nothing here trains under
DeepSpeed: the allowed names are untested there (README, "Distributed")."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from harness import TINY_MODEL

from lit_optim.errors import IncompatibleConfigError
from lit_optim.param_groups import build_param_groups
from lit_optim.registry import get_spec
from lit_optim.spec import CPU, FSDP1
from lit_optim.task.module import LanguageModelTask

# One name per kind of refusal, and the allowed elementwise ones.
ALLOWED = ["adamw_torch", "sgd", "schedule_free_adamw"]
REFUSED = {"muon": "use FSDP2", "adamw_fused_8bit": "use FSDP2", "adamw_torch_8bit": "use FSDP2",
           "adamw_bnb_8bit": "use DDP", "galore_adamw": "use DDP", "stable_adamw": "use FSDP2"}


def deepspeed_trainer(**settings):
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    return SimpleNamespace(**{"strategy": strategy, "accumulate_grad_batches": 1, "gradient_clip_val": None,
                              "precision_plugin": SimpleNamespace(scaler=None), "estimated_stepping_batches": 10,
                              **settings})


def configure(optim: dict):
    module = LanguageModelTask(model=TINY_MODEL, optim={"lr": 1e-2, **optim})
    module._trainer = deepspeed_trainer()
    module.configure_model()
    return module.configure_optimizers()


@pytest.mark.parametrize("name", ALLOWED)
def test_elementwise_names_pass_under_deepspeed(name):
    assert FSDP1 in get_spec(name).supports
    configure({"name": name})


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_other_names_are_refused_before_step_1_under_deepspeed(name):
    spec = get_spec(name)
    assert FSDP1 not in spec.supports and CPU in spec.supports
    with pytest.raises(IncompatibleConfigError) as err:
        configure({"name": name})
    msg = str(err.value)
    assert "strategy='deepspeed'" in msg and "flat 1-D partitions" in msg and REFUSED[name] in msg, msg
    assert spec.unsupported_why[FSDP1] in msg  # the name's own reason


@pytest.mark.parametrize(("extra", "says"), [
    ({"in_backward": True}, "strategy DeepSpeedStrategy reduces gradients across processes in its own autograd hooks"),
    ({"offload": "cpu"}, "use DeepSpeed's own offload (DeepSpeedStrategy(offload_optimizer=True))"),
])
def test_in_backward_and_offload_are_refused_under_deepspeed(extra, says):
    with pytest.raises(IncompatibleConfigError) as err:
        configure({"name": "adamw_torch", **extra})
    assert says in str(err.value), str(err.value)


def test_zero3_partitions_keep_their_weight_decay():
    """ZeRO-3 builds the model partitioned: each parameter's data is empty, its whole shape in `ds_shape`."""
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    for p in net.parameters():
        p.ds_shape = p.shape
        p.data = torch.empty(0)
    plan = build_param_groups(net, lr=1e-3, weight_decay=0.1)
    assert {i.name for i in plan.param_info.values() if i.decay} == {"0.weight"}, plan.summary()
