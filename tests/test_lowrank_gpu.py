"""On a CUDA GPU: the projection and in-backward optimizers train and resume exactly on the device, and FSDP -- which
needs a GPU even to start -- is refused before step 1 with the reason."""

from __future__ import annotations

import pytest
from lowrank_support import LOWRANK_HP, assert_state_matches_theory, assert_trains_and_resumes, fit_must_fail

from lit_optim.errors import IncompatibleConfigError

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name, hp", [
    ("galore_adamw", LOWRANK_HP), ("galore_adamw_8bit", LOWRANK_HP), ("apollo_mini", {"update_proj_gap": 4}),
    ("adam_mini", {}), ("galore_adamw_layerwise", LOWRANK_HP), ("adalomo", {}),
])
def test_trains_and_resumes_on_cuda(name, hp, tmp_path):
    t1, _, _ = assert_trains_and_resumes({"name": name, "lr": 1e-2, **hp}, tmp_path, accelerator="gpu",
                                         drop=0.1 if name == "adalomo" else 0.3)
    # Lightning moves the module and the optimizer state back to the CPU at teardown; the run itself was on CUDA.
    assert t1.strategy.root_device.type == "cuda"
    assert_state_matches_theory(t1.optimizers[0])


@pytest.mark.parametrize("name, reason", [
    ("galore_adamw", "does not support FSDP"), ("apollo_mini", "does not support FSDP"),
    ("adam_mini", "does not support FSDP"), ("galore_adamw_layerwise", "reduce-scatters"),
    ("lomo", "reduce-scatters"),
])
def test_fsdp_is_refused_before_step_1(name, reason, tmp_path):
    fit_must_fail({"name": name, "lr": 1e-2}, IncompatibleConfigError, tmp_path, accelerator="gpu", strategy="fsdp",
                  match=reason)
