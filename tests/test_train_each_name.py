"""Every registry name trains the built-in task under a real Lightning Trainer, its loss falls, and a run resumed from
a mid-run checkpoint ends with exactly the parameters and optimizer state of the uninterrupted run.

One test per name (its own test id); training and resume share the run to keep CI short. GPU-only names are marked
`gpu` and run on a GPU. lit_optim's own optimizers from the later issues (backend "lit_optim": GaLore, APOLLO, LOMO,
Adam-mini, layer-wise, HF Adafactor) are trained and resumed per name in their own modules (tests/test_galore.py,
test_apollo.py, test_lomo.py, test_adam_mini.py, test_in_backward.py) and skipped here so CI runs them once.
"""

from __future__ import annotations

import pytest
from harness import resume_matches

import lit_optim
from lit_optim.spec import CPU

STEPS = 12  # checkpoint at 6, resume, continue to 12

# A sane learning rate per algorithm family for the tiny LM; everything else uses DEFAULT_LR.
DEFAULT_LR = 1e-2
LR = {
    "sgd": 0.5, "sgd_8bit": 0.1, "schedule_free_sgd": 1.0, "schedule_free_radam": 0.1,
    "lion_8bit": 5e-3, "lion_32bit": 5e-3, "paged_lion_8bit": 5e-3, "paged_lion_32bit": 5e-3,
    "adagrad": 5e-2, "adagrad_8bit": 5e-2,
    "rmsprop": 2e-3, "rmsprop_bnb": 2e-3, "rmsprop_bnb_8bit": 2e-3, "rmsprop_bnb_32bit": 2e-3,
    "muon": 2e-2, "adafactor_torch": 3e-2,
    "flash_sgd": 0.1, "flash_sgdw": 0.1, "flash_lion": 5e-3,
}


def gpu_only(name: str) -> bool:
    spec = lit_optim.get_spec(name)
    return spec.requires_cuda or CPU not in spec.supports


NAMES = [pytest.param(n, marks=pytest.mark.gpu) if gpu_only(n) else n for n in lit_optim.list_optimizers()]


@pytest.mark.parametrize("name", NAMES)
def test_trains_and_resumes_exactly(name, tmp_path):
    if lit_optim.get_spec(name).backend == "lit_optim":
        pytest.skip("lit_optim's own optimizer: trained and resumed per name in its own test module")
    optim = {"name": name, "lr": LR.get(name, DEFAULT_LR)}
    kw = {"accelerator": "gpu"} if gpu_only(name) else {}
    params_equal, state_equal, losses = resume_matches(optim, tmp_path, steps=STEPS, **kw)

    assert len(losses) == STEPS
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.3, f"{name}: loss did not fall: {[round(x, 3) for x in losses]}"
    assert params_equal, f"{name}: parameters after resume differ from the uninterrupted run"
    assert state_equal, f"{name}: optimizer state after resume differs from the uninterrupted run"
