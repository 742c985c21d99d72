"""Core registry checks that need a CUDA GPU: GPU-only names (FP8, paged 32-bit AdEMAMix) and real paging.

Run on a GPU machine with `python -m pytest -m gpu tests/`; skipped on CPU.
"""

from __future__ import annotations

import pytest
import torch
from harness import resume_matches, run_task
from lightning.pytorch.callbacks import Callback

import lit_optim
from lit_optim.spec import CPU
from lit_optim.state_bytes import state_bytes_by_param

pytestmark = pytest.mark.gpu

GPU_ONLY = [n for n in lit_optim.list_optimizers()
            if CPU not in lit_optim.get_spec(n).supports or lit_optim.get_spec(n).requires_cuda]
PAGED = [n for n in lit_optim.list_optimizers() if lit_optim.get_spec(n).paged]
# Wide enough that bitsandbytes pages the MLP weights (it pages tensors of >= 1e5 elements).
WIDE_MODEL = {"arch": "tiny", "vocab_size": 256, "d_model": 256, "n_layers": 2, "n_heads": 4, "max_seq_len": 32}
LR = {"flash_sgd": 0.1, "flash_sgdw": 0.1}  # SGD needs more than the 3e-3 the adaptive names train with


def test_gpu_only_names_exist():
    assert {"adamw_fp8", "adam_fp8", "paged_ademamix_32bit"} <= set(GPU_ONLY)


@pytest.mark.parametrize("name", GPU_ONLY)
def test_gpu_only_name_state_matches_theory(name):
    spec = lit_optim.get_spec(name)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 8)).cuda()
    opt = lit_optim.build_optimizer(model, name, lr=1e-3)
    for _ in range(2):
        model(torch.randn(4, 512, device="cuda")).square().mean().backward()
        opt.step()
        opt.zero_grad()
    measured = state_bytes_by_param(opt)[model[0].weight]
    theory = spec.state_bytes((512, 512), opt.lit_optim.hyperparameters)
    assert abs(measured - theory) <= 0.01 * theory, (measured, theory)


@pytest.mark.parametrize("name", GPU_ONLY)
def test_gpu_only_name_trains_and_resumes_exactly(name, tmp_path):
    params_equal, state_equal, losses = resume_matches(
        {"name": name, "lr": LR.get(name, 3e-3)}, tmp_path, steps=16, accelerator="gpu",
        scheduler={"name": "cosine", "warmup_steps": 2},
    )
    assert losses[-1] < losses[0] - 0.1, losses
    assert params_equal and state_equal


@pytest.mark.parametrize("name", PAGED)
def test_paged_state_is_managed_memory_and_survives_resume(name, tmp_path):
    _, trainer, losses = run_task({"name": name, "lr": 1e-3}, 4, accelerator="gpu", model=WIDE_MODEL)
    opt = trainer.optimizers[0]
    # bitsandbytes pages a state when its *parameter* has >= 1e5 elements (AdEMAMix's state1 is twice the parameter).
    paged = [t for p, s in opt.state.items() if p.numel() >= 1e5 for k, t in s.items() if k in ("state1", "state2")]
    assert paged and all(getattr(t, "is_paged", False) for t in paged)

    params_equal, state_equal, _ = resume_matches({"name": name, "lr": 1e-3}, tmp_path, steps=8, accelerator="gpu",
                                                  model=WIDE_MODEL)
    assert params_equal and state_equal


def test_fused_adamw_on_gpu_is_fused():
    model = torch.nn.Linear(64, 64).cuda()
    opt = lit_optim.build_optimizer(model, "adamw_torch_fused")
    assert all(g["fused"] for g in opt.param_groups)


class PagedAtTrainEnd(Callback):
    """At the end of each fit (straight and resumed): every large state tensor of every paged (sub-)optimizer is
    paged. After a resume that is lit_optim's re-paging at work: bitsandbytes' load_state_dict unpages."""

    def __init__(self) -> None:
        self.checked: list[int] = []

    def on_train_end(self, trainer, pl_module) -> None:
        from lit_optim.nesting import leaves as _leaves

        leaves = [o for o in _leaves(trainer.optimizers) if getattr(o, "is_paged", False)]
        large = [t for o in leaves for p, s in o.state.items() if p.numel() >= 1e5
                 for k, t in s.items() if k in ("state1", "state2")]
        assert large and all(getattr(t, "is_paged", False) for t in large)
        self.checked.append(len(large))


@pytest.mark.parametrize("hp", [{}, {"in_backward": True}], ids=["normal", "in_backward"])
def test_paged_state_is_paged_again_after_resume(hp, tmp_path):
    probe = PagedAtTrainEnd()
    params_equal, state_equal, _ = resume_matches({"name": "paged_adamw_8bit", "lr": 1e-3, **hp}, tmp_path, steps=8,
                                                  accelerator="gpu", model=WIDE_MODEL, callbacks=[probe])
    assert params_equal and state_equal
    assert len(probe.checked) == 2 and probe.checked[0] == probe.checked[1]
