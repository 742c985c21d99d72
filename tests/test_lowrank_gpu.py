"""On a CUDA GPU: the projection and in-backward optimizers train and resume exactly on the device, and FSDP -- which
needs a GPU even to start -- is refused before step 1 with the reason."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lowrank_support import LOWRANK_HP, assert_state_matches_theory, assert_trains_and_resumes, fit_must_fail

from lit_optim.errors import IncompatibleConfigError

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name, hp", [
    ("galore_adamw", LOWRANK_HP), ("galore_adamw_8bit", LOWRANK_HP), ("apollo_mini", {"update_proj_gap": 4}),
    ("adam_mini", {}), ("galore_adamw_layerwise", LOWRANK_HP), ("adalomo", {}),
])
def test_trains_and_resumes_on_cuda(name, hp, tmp_path):
    checked = StateOnCuda()
    t1, _, _ = assert_trains_and_resumes({"name": name, "lr": 1e-2, **hp}, tmp_path, accelerator="gpu",
                                         drop=0.1 if name == "adalomo" else 0.3, callbacks=[checked])
    assert t1.strategy.root_device.type == "cuda"
    assert checked.runs == 2  # the straight run and the resumed one


class StateOnCuda(Callback):
    """State bytes against the theory at the end of training, while the state is still on the GPU: at teardown
    Lightning moves optimizer state to the CPU tensor by tensor, which unshares bitsandbytes' quantization maps."""

    runs = 0

    def on_train_end(self, trainer, pl_module) -> None:
        opt = trainer.optimizers[0]
        tensors = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        assert all(t.is_cuda for t in tensors if t.numel() > 1)  # not `step` counters, which torch keeps on the CPU
        assert_state_matches_theory(opt)
        self.runs += 1


@pytest.mark.parametrize("name, reason", [
    ("galore_adamw", "does not support FSDP"), ("apollo_mini", "does not support FSDP"),
    ("adam_mini", "does not support FSDP"), ("galore_adamw_layerwise", "reduce-scatters"),
    ("lomo", "reduce-scatters"),
])
def test_fsdp_is_refused_before_step_1(name, reason, tmp_path):
    fit_must_fail({"name": name, "lr": 1e-2}, IncompatibleConfigError, tmp_path, accelerator="gpu", strategy="fsdp",
                  match=reason)
