"""A battery of bad optimizer inputs: every one refused before step 1 with one line naming the problem, or working.

Run through `lit_optim.build_optimizer` (what the mixin and `lit-optim train` call) for every backend family, and a
sample through `lit-optim train` itself. Run-level inputs (seed, accumulation, data against model, directories,
checkpoints) are in tests/test_run_inputs.py.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import lit_optim
from lit_optim.errors import LitOptimError

# One name per family: torch, bitsandbytes (8-bit, paged), torchao (8/4-bit), lit_optim's own (Adafactor, GaLore,
# APOLLO, Adam-mini, in-backward).
FAMILIES = ["adamw_torch", "sgd", "adamw_8bit", "paged_adamw_8bit", "adamw_torch_8bit", "adamw_torch_4bit",
            "adafactor", "galore_adamw", "apollo_adamw", "adam_mini", "galore_adamw_layerwise", "lomo"]


class Net(nn.Module):
    """Big enough that the 8-bit names quantize (tensors of >= 4096 elements); heads for Adam-mini."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(128, 64)
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)
        self.head = nn.Linear(64, 128, bias=False)
        self.n_heads = 4

    def forward(self, x):
        return self.head(self.down(torch.relu(self.up(self.embed(x)))))


def refused(name: str, match: str, **hp) -> str:
    """build_optimizer must raise lit_optim's error, in one line, containing `match`; returns the message."""
    with pytest.raises(LitOptimError) as info:
        lit_optim.build_optimizer(Net(), name, **hp)
    message = str(info.value)
    assert "\n" not in message and match in message, message
    return message


CASES: list[tuple[str, dict, str]] = []
for _name in FAMILIES:
    for _lr in (math.nan, math.inf, -1e-3):
        CASES.append((_name, {"lr": _lr}, "lr="))
    CASES.append((_name, {"lr": "fast"}, "wrong type"))
for _name in ("adamw_torch", "adamw_8bit", "adamw_torch_8bit", "galore_adamw", "adam_mini"):
    CASES += [
        (_name, {"betas": (1.0, 0.999)}, "must be in [0, 1)"),
        (_name, {"betas": (0.9, 1.5)}, "must be in [0, 1)"),
        (_name, {"betas": (-0.1, 0.999)}, "must be in [0, 1)"),
        (_name, {"betas": (0.9,)}, "a list of 2 values"),
        (_name, {"eps": 0.0}, "must be > 0"),
        (_name, {"eps": -1e-8}, "must be > 0"),
        (_name, {"weight_decay": -0.1}, "must be >= 0"),
        (_name, {"weight_decay": math.nan}, "not a finite number"),
    ]
CASES += [
    ("sgd", {"momentum": -0.5}, "must be in [0, 1)"),
    ("sgd", {"momentum": 1.5}, "must be in [0, 1)"),
    ("adamw_torch_8bit", {"block_size": 100}, "would quantize no tensor"),
    ("adamw_torch_4bit", {"block_size": 0}, "must be >= 1"),
    ("adamw_torch_8bit", {"block_size": 2.5}, "whole number"),
    ("adamw_8bit", {"min_8bit_size": 10**9}, "would quantize no tensor"),
    ("adamw_8bit", {"min_8bit_size": -1}, "must be >= 0"),
    ("galore_adamw", {"rank": 0}, "must be >= 1"),
    ("galore_adamw", {"rank": 1000}, "Use rank < 64"),
    ("apollo_adamw", {"rank": 1000}, "Use rank < 64"),
    ("galore_adamw", {"update_proj_gap": 0}, "must be >= 1"),
    ("galore_adamw", {"rank": 1.5}, "whole number"),
    ("adamw_torch", {"no_decay": 5}, "no_decay"),
    ("adamw_torch", {"no_decay": ["("]}, "not a regular expression"),
    ("adamw_torch", {"lr_scales": "0.1"}, "lr_scales must map"),
    ("adamw_torch", {"lr_scales": {"embedding": math.inf}}, "non-negative finite"),
    ("adamw_torch", {"in_backward": "yes"}, "in_backward must be true or false"),
    ("adamw_torch", {"offload": "gpu"}, "offload must be null or one of"),
    ("adamw_torch", {"offload_gradients": True}, "needs offload=cpu"),
    ("adamw_8bit", {"embedding_state_32bit": "no"}, "embedding_state_32bit must be true or false"),
    ("adamw_torch", {"in_backward": True, "clip_per_param_norm": 0}, "positive number"),
    ("adamw_torch", {"lrr": 1e-3}, "Did you mean lr"),
    ("adamw_8bit", {"optim_bits": 32}, "fixes optim_bits=8"),
    ("paged_adamw_8bit", {"is_paged": False}, "fixes is_paged=True"),
    ("galore_adamw_8bit", {"inner": "adamw_torch"}, "fixes inner="),
    ("galore", {"inner": "lamb_8bit"}, "trust ratio"),
    ("galore", {"inner": "no_such_optimizer"}, "no_such_optimizer"),
    ("adamw_torch", {"amsgrad": "yes"}, "true or false"),
    ("adafactor", {"clip_threshold": math.nan}, "not a finite number"),
    ("lion_8bit", {"betas": (0.9, 1.0)}, "must be in [0, 1)"),
    ("ademamix_8bit", {"betas": (0.9, 0.999, 1.0)}, "must be in [0, 1)"),
    ("adamw_torch", {"maximize": "yes"}, "true or false"),
    ("schedule_free_adamw", {"in_backward": True}, "schedule-free"),
    ("paged_adamw_8bit", {"offload": "cpu"}, "paged"),
    ("galore_adamw", {"offload": "cpu"}, "structure"),
    ("adamw_fused_8bit", {"block_size": 100}, "power of two"),
    ("adamw_fused_4bit", {"block_size": 16}, "power of two"),
    ("adamw_fused_4bit", {"bits": 8}, "fixes bits=4"),
    ("lion_fused_8bit", {"kernel": "cuda"}, "choose one of"),
    ("adamw_fused_8bit", {"stochastic_rounding": "yes"}, "true or false"),
    ("adam_fused_8bit", {"betas": (0.9, 1.0)}, "must be in [0, 1)"),
]


def _id(case) -> str:
    name, hp, _ = case
    return f"{name}-" + "-".join(f"{k}={v!r}" for k, v in hp.items())


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_bad_optimizer_input_is_refused_in_one_line(case):
    name, hp, match = case
    refused(name, match, **hp)


def test_the_battery_is_at_least_ninety_cases():
    assert len(CASES) >= 90


def test_every_family_refuses_the_same_bad_values_the_same_way():
    """The same value gets the same words, whatever the backend."""
    tails = {refused(name, "lr=", lr=math.nan).split(": ", 1)[1] for name in FAMILIES}
    assert len(tails) == 1, tails


# --- FlashOptim names: refused where they cannot run; bad values refused as for every other name -------------------
FLASH = ["flash_adamw", "flash_adam", "flash_lion", "flash_sgd", "flash_sgdw"]


def pretend_gpu(monkeypatch, capability: tuple[int, int], name: str = "NVIDIA H100") -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)


@pytest.mark.parametrize("name", FLASH)
def test_flash_names_are_refused_where_they_cannot_run(name, monkeypatch):
    from lit_optim.builders import construct

    if not torch.cuda.is_available():
        refused(name, "runs only on a CUDA GPU and this machine has none")
    pretend_gpu(monkeypatch, (7, 5), "Tesla T4")  # Turing: older than Triton supports
    message = refused(name, "needs CUDA compute capability >= 8.0")
    assert "Tesla T4" in message and "is 7.5" in message and "Ampere" in message
    # A capable GPU (flashoptim need not be installed for this), but the model left on the host.
    pretend_gpu(monkeypatch, (9, 0))
    monkeypatch.setattr(construct, "requirement_problem", lambda spec: None)
    message = refused(name, "parameters of this model are on cpu")
    assert "Move the model to the GPU" in message


FLASH_CASES: list[tuple[str, dict, str]] = [
    ("flash_adamw", {"lr": math.nan}, "not a finite number"),
    ("flash_adam", {"lr": -1.0}, "must be >= 0"),
    ("flash_adamw", {"betas": (0.9, 1.0)}, "must be in [0, 1)"),
    ("flash_adam", {"eps": 0.0}, "must be > 0"),
    ("flash_lion", {"weight_decay": -0.1}, "must be >= 0"),
    ("flash_sgd", {"momentum": 1.5}, "must be in [0, 1)"),
    ("flash_adamw", {"master_weight_bits": 16}, "must be 24, 32 or null"),
    ("flash_lion", {"master_weight_bits": "24"}, "must be 24, 32 or null"),
    ("flash_adamw", {"quantize": "yes"}, "true or false"),
    ("flash_adamw", {"compress_state_dict": 1}, "true or false"),
    ("flash_sgdw", {"nesterov": "no"}, "true or false"),
    ("flash_adamw", {"block_size": 64}, "does not take hyperparameter 'block_size'"),
    ("flash_adamw", {"lr": torch.tensor(1e-3)}, "takes lr as a number"),
    ("flash_adamw", {"offload": "cpu"}, "cannot use offload='cpu'"),
]


@pytest.mark.parametrize("case", FLASH_CASES, ids=[_id(c) for c in FLASH_CASES])
def test_bad_flash_input_is_refused_in_one_line(case, monkeypatch):
    """On a (pretended) capable GPU, so that the values are what is refused; all before flashoptim is imported."""
    from lit_optim.builders import construct

    pretend_gpu(monkeypatch, (9, 0))
    monkeypatch.setattr(construct, "requirement_problem", lambda spec: None)
    name, hp, match = case
    refused(name, match, **hp)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a machine without CUDA")
def test_cli_refuses_a_flash_name_without_cuda(tmp_path):
    from cli_inprocess import run_train

    code, err = run_train(tmp_path / "run", "trainer.max_steps=2", "optim=flash_adamw")
    assert code == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("lit-optim: ") and "runs only on a CUDA GPU" in last, last


# --- inputs that work ----------------------------------------------------------------------------------------------
def test_a_single_no_decay_pattern_is_one_regex_not_its_characters():
    model = Net()
    opt = lit_optim.build_optimizer(model, "adamw_torch", weight_decay=0.1, no_decay="up")
    decay = {g["name"]: g for g in opt.param_groups}["decay"]
    assert decay["weight_decay"] == 0.1
    decayed = {id(p) for p in decay["params"]}
    assert decayed == {id(model.embed.weight), id(model.down.weight), id(model.head.weight)}  # "up" matched up only


def test_a_tied_weight_listed_twice_is_stepped_once():
    model = Net()
    named = [*model.named_parameters(), ("alias.weight", model.embed.weight)]
    opt = lit_optim.build_optimizer(named, "sgd", lr=0.1, weight_decay=0.0)
    assert sum(p is model.embed.weight for g in opt.param_groups for p in g["params"]) == 1
    model.embed.weight.grad = torch.ones_like(model.embed.weight)
    before = model.embed.weight.detach().clone()
    opt.step()
    assert torch.allclose(model.embed.weight, before - 0.1)  # one step of lr * grad, not two


def test_defaults_that_quantize_little_are_warned_about_with_the_share():
    tiny = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with pytest.warns(UserWarning, match=r"8-bit state for 0% of the parameters"):
        lit_optim.build_optimizer(tiny, "adamw_torch_8bit")


def test_a_rank_as_wide_as_the_weights_is_warned_about():
    with pytest.warns(UserWarning, match=r"rank=64 reaches the smaller side of 3 of 3 projected weights"):
        lit_optim.build_optimizer(Net(), "galore_adamw", rank=64, target_modules=["up", "down", "head"])


def test_good_values_build_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("adamw_torch", "adamw_torch_8bit", "galore_adamw"):
            lit_optim.build_optimizer(Net(), name, **({"rank": 16} if name.startswith("galore") else {}))


# --- through `lit-optim train` -------------------------------------------------------------------------------------
CLI = [
    ("optim.lr=inf", "lr=inf is not a finite number"),
    ("optim=sgd optim.lr=nan", "lr=nan is not a finite number"),
    ("optim=adamw_torch_8bit optim.block_size=100", "would quantize no tensor"),
    ("optim=galore_adamw optim.rank=256", "Use rank < 128"),
    ("optim.weight_decay=-0.1", "must be >= 0"),
    ("optim.betas=[0.9,1.0]", "must be in [0, 1)"),
]


@pytest.mark.parametrize("overrides, match", CLI, ids=[c[0] for c in CLI])
def test_cli_refuses_bad_optimizer_values_before_step_one(tmp_path, overrides, match):
    from cli_inprocess import run_train

    run = tmp_path / "run"
    code, err = run_train(run, "trainer.max_steps=2", *overrides.split())
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("lit-optim: ") and match in last, last
    assert not list(run.rglob("*.ckpt"))


def test_cli_no_decay_as_one_string_keeps_weight_decay_on(tmp_path):
    from cli_inprocess import run_train

    code, err = run_train(tmp_path / "run", "trainer.max_steps=1", "+optim.no_decay=bias", "optim.weight_decay=0.1")
    assert code == 0, err[-2000:]
