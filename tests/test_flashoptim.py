"""The FlashOptim names (``flash_*``) without a GPU: their claims, their state theory, what the monitors count, the
check of what was built, and checkpoints.

FlashOptim's step is Triton only, so nothing here steps it the way a GPU does. The accounting runs on state made by
hand in the layout flashoptim keeps on a GPU: per moment, 8-bit codes shaped like the parameter (int8; uint8 for
Adam's second moment) and one fp16 scale per 32 values; Adam's int64 ``step``; for bf16/fp16 parameters an int8
(24-bit master weights) or int16 (32-bit) ``error_bits`` tensor shaped like the parameter. Where flashoptim is
installed, that state sits in its own objects, and its own ``state_dict``/``load_state_dict`` carry it through
``torch.save`` and ``torch.load(weights_only=True)``. What only a GPU can show is in tests/test_flashoptim_gpu.py.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import pytest
import tomllib
import torch
from harness import states_equal
from torch import nn

import lit_optim
from lit_optim.build import BuildInfo
from lit_optim.builders import flashoptim as flash
from lit_optim.builders.construct import verify
from lit_optim.errors import DeviceRequirementError
from lit_optim.param_groups import build_param_groups
from lit_optim.spec import DDP, GRAD_ACCUM, GRAD_CLIP, constructor_arguments
from lit_optim.state_bytes import state_bytes_by_param, state_report, state_tensors
from lit_optim.state_theory import expected_state_bytes

NAMES = ["flash_adamw", "flash_adam", "flash_lion", "flash_sgd", "flash_sgdw"]
CLASSES = {"flash_adamw": "FlashAdamW", "flash_adam": "FlashAdam", "flash_lion": "FlashLion", "flash_sgd": "FlashSGD",
           "flash_sgdw": "FlashSGDW"}
# Each class's moments and the dtype of their codes on a GPU.
MOMENTS = {"FlashAdamW": {"exp_avg": torch.int8, "exp_avg_sq": torch.uint8},
           "FlashAdam": {"exp_avg": torch.int8, "exp_avg_sq": torch.uint8},
           "FlashLion": {"exp_avg": torch.int8},
           "FlashSGD": {"momentum_buffer": torch.int8},
           "FlashSGDW": {"momentum_buffer": torch.int8}}
CORRECTION_DTYPE = {1: torch.int8, 2: torch.int16}
ROOT = Path(__file__).resolve().parent.parent


class Net(nn.Module):
    """Tensor sizes that are and are not multiples of flashoptim's 32-value scale groups."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 96)  # weight 6144 (192 groups), bias 96
        self.norm = nn.LayerNorm(96)
        self.down = nn.Linear(96, 10)  # weight 960, bias 10 (one padded group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.norm(self.up(x))))


class Moment:
    """Stands in for flashoptim's per-moment object (``_MaybeQuantizedTensor``): the same three attributes hold the
    data -- full-precision ``_data``, or ``_quantized`` codes and ``_scales`` (checked against the real class in
    `test_the_stand_in_holds_state_as_flashoptim_does`)."""

    def __init__(self) -> None:
        self._data = self._quantized = self._scales = None


def correction_bytes(p: torch.Tensor, bits: int | None) -> int:
    """Bytes of error-correction bits per element flashoptim keeps for `p` (master bytes minus the parameter's)."""
    return max(0, (bits or 0) // 8 - p.element_size())


def gpu_layout(name: str, p: torch.Tensor, hp: dict, state: dict | None = None) -> dict:
    """`p`'s state as flashoptim keeps it on a GPU after a step, written into `state`'s moment objects if given."""
    gen = torch.Generator().manual_seed(p.numel())
    state = {} if state is None else state
    cls = CLASSES[name]
    if not (cls.startswith("FlashSGD") and not hp.get("momentum")):
        for key, code in MOMENTS[cls].items():
            moment = state.setdefault(key, Moment())
            if hp.get("quantize", True):
                low, high = (-127, 128) if code == torch.int8 else (0, 256)
                moment._data = None
                moment._quantized = torch.randint(low, high, tuple(p.shape), generator=gen).to(code)
                moment._scales = torch.rand(math.ceil(p.numel() / 32), generator=gen).to(torch.float16)
            else:
                moment._data = torch.randn(tuple(p.shape), generator=gen).to(p.dtype)
                moment._quantized = moment._scales = None
    if cls.startswith("FlashAdam"):
        state["step"] = torch.tensor(3, dtype=torch.int64)
    extra = correction_bytes(p, hp.get("master_weight_bits", 24))
    if extra:
        state["error_bits"] = torch.randint(-(2 ** 15), 2 ** 15, tuple(p.shape), generator=gen).to(
            CORRECTION_DTYPE[extra])
    return state


def carrier(name: str, model: nn.Module, **hp) -> torch.optim.Optimizer:
    """An optimizer object over `model`'s lit_optim param groups holding `name`'s GPU state, recorded as built from
    `name`: what the monitors and the theory read."""
    spec = lit_optim.get_spec(name)
    plan = build_param_groups(model, lr=1e-3, weight_decay=0.0)
    opt = torch.optim.SGD(plan.groups, lr=1e-3)
    hp = {**spec.defaults, **hp}
    for p in model.parameters():
        opt.state[p] = gpu_layout(name, p, hp)
    opt.lit_optim = BuildInfo(name, spec, hp, plan)
    return opt


def check_accounting(opt, model: nn.Module) -> None:
    """Monitor (storages) and theory agree per parameter; correction bits are counted but are not quantized state."""
    hp = opt.lit_optim.hyperparameters
    params = list(model.parameters())
    measured = state_bytes_by_param(opt)
    for p in params:
        step = 8 if "step" in opt.state[p] else 0  # Adam's int64 step: a scalar the theories leave out
        assert measured[p] == expected_state_bytes(opt, p) + step, (tuple(p.shape), p.dtype)
    report = state_report(opt)
    total = sum(p.numel() for p in params)
    assert report.total.bytes == sum(measured.values())
    corrections = sum(correction_bytes(p, hp["master_weight_bits"]) * p.numel() for p in params)
    assert report.total.weight_correction_bytes == corrections
    assert report.metrics()["optim_state/weight_correction_bytes"] == corrections
    moments = any(k != "step" and k != "error_bits" for p in params for k in opt.state[p])
    quantized = moments and hp["quantize"]
    assert report.total.quantized_params == (total if quantized else 0)
    assert report.total.full_precision_params == (0 if quantized or not (moments or corrections) else total)
    dtypes = report.total.by_dtype
    if quantized:
        assert dtypes["float16"] == sum(2 * math.ceil(p.numel() / 32) for p in params) * len(
            MOMENTS[CLASSES[opt.lit_optim.name]])


# --- the names and their claims -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_name_claims(name):
    spec = lit_optim.get_spec(name)
    assert spec.backend == "flashoptim" and spec.target == f"flashoptim:{CLASSES[name]}"
    assert spec.requires_cuda and spec.min_compute_capability == (8, 0) and spec.bits == 8
    assert spec.supports == {DDP, GRAD_CLIP, GRAD_ACCUM}  # no CPU, no FSDP
    assert "pip install 'lit-optim[flashoptim]'" in spec.install_hint
    assert spec.defaults["quantize"] is True and spec.defaults["master_weight_bits"] == 24
    assert spec.defaults.get("momentum") == (0.9 if name.startswith("flash_sgd") else None)
    assert name in lit_optim.list_optimizers("flash_*")
    text = lit_optim.describe(name)
    assert "CUDA only (compute capability >= 8.0)" in text and "master_weight_bits = 24" in text
    assert "quantize = True" in text  # listed even where the machine cannot run it


def test_the_flashoptim_extra():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["flashoptim"] == ["flashoptim>=0.1.4"]
    # In `all`: it installs and imports on a CPU machine (pure Python and triton), and lit_optim never imports it
    # where there is no GPU to run it (the arguments are declared, the machine is checked first).
    assert "flashoptim" in extras["all"][0]


@pytest.mark.parametrize("name, hp, param_bytes, per_param", [
    ("flash_adamw", {}, 4, 2.125),  # two 1-byte codes + 2 fp16 scales per 32 values; fp32 weights: no correction
    ("flash_adamw", {}, 2, 3.125),  # bf16 weights: + 1 byte for 24-bit master weights
    ("flash_adamw", {"master_weight_bits": 32}, 2, 4.125),
    ("flash_adamw", {"master_weight_bits": 32}, 4, 2.125),
    ("flash_adam", {"master_weight_bits": None}, 2, 2.125),
    ("flash_adamw", {"quantize": False}, 2, 5.0),  # two bf16 moments + 1
    ("flash_adamw", {"quantize": False}, 4, 8.0),
    ("flash_lion", {}, 2, 2.0625),
    ("flash_sgd", {}, 4, 1.0625),
    ("flash_sgdw", {"momentum": 0.0}, 2, 1.0),  # no momentum, no moment: only the correction bits
    ("flash_sgd", {"momentum": 0.0}, 4, 0.0),
])
def test_state_theory(name, hp, param_bytes, per_param):
    spec = lit_optim.get_spec(name)
    shape = (4096, 4096)
    got = spec.state_bytes(shape, {**spec.defaults, **hp, "param_bytes": param_bytes})
    assert got == per_param * 4096 * 4096
    if param_bytes == 4:
        assert spec.bytes_per_param(hp) == per_param  # the table and describe() count fp32 weights
    # A size the 32-value groups do not divide: the last group is padded to a whole scale.
    n = 100
    moments = 2 if name in ("flash_adamw", "flash_adam") else (0 if hp.get("momentum") == 0.0 else 1)
    code = n + 2 * 4 if hp.get("quantize", True) else param_bytes * n
    bits = hp.get("master_weight_bits", 24)
    assert spec.state_bytes((n,), {**spec.defaults, **hp, "param_bytes": param_bytes}) == (
        moments * code + max(0, (bits or 0) // 8 - param_bytes) * n)


# --- what the monitors count -------------------------------------------------------------------------------------

LAYOUTS = [
    ("flash_adamw", torch.bfloat16, {}),
    ("flash_adamw", torch.bfloat16, {"master_weight_bits": 32}),
    ("flash_adam", torch.float32, {}),
    ("flash_lion", torch.bfloat16, {"master_weight_bits": None}),
    ("flash_lion", torch.float16, {}),
    ("flash_sgd", torch.bfloat16, {"quantize": False}),
    ("flash_sgdw", torch.bfloat16, {"momentum": 0.0}),
]


@pytest.mark.parametrize("name, dtype, hp", LAYOUTS, ids=[f"{n}-{d}-{h}" for n, d, h in LAYOUTS])
def test_monitor_counts_what_flashoptim_keeps(name, dtype, hp):
    model = Net().to(dtype)
    check_accounting(carrier(name, model, **hp), model)


def test_monitor_numbers_worked_by_hand():
    """flash_adamw on bf16 weights with 24-bit master weights, for the 96 x 64 weight: codes 6144 + 6144, scales
    2 x 192 x 2 bytes, correction bits 6144, step 8."""
    model = Net().to(torch.bfloat16)
    opt = carrier("flash_adamw", model)
    assert state_bytes_by_param(opt)[model.up.weight] == 6144 * 3 + 768 + 8
    report = state_report(opt)
    assert report.total.weight_correction_bytes == sum(p.numel() for p in model.parameters())
    assert report.total.by_dtype["int8"] == 2 * sum(p.numel() for p in model.parameters())  # first moment + bits
    assert report.total.by_dtype["uint8"] == sum(p.numel() for p in model.parameters())  # second moment
    assert report.total.by_dtype["int64"] == 8 * len(list(model.parameters()))


def test_state_tensors_finds_the_codes_inside_a_moment_object():
    p = torch.zeros(40)
    state = gpu_layout("flash_lion", p, {})
    found = list(state_tensors(state["exp_avg"]))
    assert [t.dtype for t in found] == [torch.int8, torch.float16] and found[1].numel() == 2


# --- the build: refusals and the master-weight setting ------------------------------------------------------------


def test_build_refuses_parameters_on_the_host():
    spec = lit_optim.get_spec("flash_adamw")
    plan = build_param_groups(Net(), lr=1e-3, weight_decay=0.0)
    with pytest.raises(DeviceRequirementError, match="parameters of this model are on cpu"):
        flash.build(plan.groups, spec, {"lr": 1e-3})


def test_master_bits_are_dropped_only_where_no_parameter_is_16_bit():
    fp32, bf16 = torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16)
    assert flash.master_bits_for(24, [fp32]) is None and flash.master_bits_for(32, [fp32, fp32]) is None
    assert flash.master_bits_for(24, [fp32, bf16]) == 24 and flash.master_bits_for(32, [bf16]) == 32
    assert flash.master_bits_for(None, [bf16]) is None


# --- with flashoptim's own objects (where it is installed) --------------------------------------------------------


@pytest.fixture
def flashoptim():
    return pytest.importorskip("flashoptim")


CPU_MODE = {"quantize": False, "master_weight_bits": None, "fused": False}  # the one mode that steps on a CPU


def eager(name: str, model: nn.Module, **hp) -> torch.optim.Optimizer:
    """`name`'s real flashoptim class over `model`, in the mode that runs on a CPU (eager step, moments in the
    parameter's dtype, no correction bits), stepped once so that every parameter has its moment objects."""
    spec = lit_optim.get_spec(name)
    plan = build_param_groups(model, lr=1e-3, weight_decay=0.0)
    extra = {k: v for k, v in spec.defaults.items() if k not in CPU_MODE}
    with warnings.catch_warnings():  # 16-bit weights with no correction bits: flashoptim warns, rightly
        warnings.simplefilter("ignore")
        opt = spec.load_class()(plan.groups, **{**extra, **CPU_MODE, **hp})
    model(torch.randn(4, 64, dtype=next(model.parameters()).dtype)).float().square().mean().backward()
    opt.step()
    opt.zero_grad()
    opt.lit_optim = BuildInfo(name, spec, {**spec.defaults, **CPU_MODE}, plan)
    return opt


def as_on_a_gpu(opt, bits: int | None) -> None:
    """Rewrite a CPU-stepped optimizer's state (and its groups' settings) into what a GPU run with quantized moments
    and `bits`-bit master weights holds, in flashoptim's own objects."""
    name = opt.lit_optim.name
    hp = {**opt.lit_optim.spec.defaults, "master_weight_bits": bits}
    for group in opt.param_groups:
        group["quantize"] = True
        group["master_bytewidth"] = {None: 0, 24: 3, 32: 4}[bits]
        for p in group["params"]:
            gpu_layout(name, p, hp, opt.state[p])
    opt.lit_optim.hyperparameters.update(quantize=True, master_weight_bits=bits)


def test_the_declared_arguments_are_the_installed_classes(flashoptim):
    for name in NAMES:
        spec = lit_optim.get_spec(name)
        real = constructor_arguments(spec.load_class())
        assert {**flash.arguments(spec), "master_weight_bits": flash.DEFAULT_MASTER_WEIGHT_BITS} == real, name


def test_the_stand_in_holds_state_as_flashoptim_does(flashoptim):
    model = Net()
    opt = eager("flash_adamw", model)
    real = opt.state[model.up.weight]["exp_avg"]
    assert type(real).__module__.startswith("flashoptim")
    assert {"_data", "_quantized", "_scales"} <= set(vars(real))
    assert set(opt.state[model.up.weight]) == {"exp_avg", "exp_avg_sq", "step"}


@pytest.mark.parametrize("name, dtype, bits", [
    ("flash_adamw", torch.bfloat16, 24), ("flash_adam", torch.float16, 32), ("flash_lion", torch.float32, 24),
    ("flash_sgd", torch.bfloat16, 32), ("flash_sgdw", torch.float16, 24),
])
def test_real_state_is_counted_and_survives_a_weights_only_checkpoint(name, dtype, bits, flashoptim):
    torch.manual_seed(0)
    model = Net().to(dtype)
    opt = eager(name, model)
    as_on_a_gpu(opt, bits)
    check_accounting(opt, model)

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(buffer) == []
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    kinds = {k.partition("::")[2] for s in saved["optimizer"]["state"].values() for k in s}
    assert {"quantized", "scales"} <= kinds  # the codes, not fp32 moments

    torch.manual_seed(1)
    fresh = Net().to(dtype)
    fresh.load_state_dict(saved["model"])
    again = eager(name, fresh)
    again.load_state_dict(saved["optimizer"])
    assert states_equal(opt, again)
    for p in fresh.parameters():
        state = again.state[p]
        for key, code in MOMENTS[CLASSES[name]].items():
            assert state[key].is_quantized() and state[key].quantized.dtype == code
            assert state[key].scales.dtype == torch.float16
        extra = correction_bytes(p, bits)
        assert (state["error_bits"].dtype == CORRECTION_DTYPE[extra]) if extra else "error_bits" not in state


def test_verify_checks_quantization_and_master_bits(flashoptim):
    spec = lit_optim.get_spec("flash_adamw")
    opt = eager("flash_adamw", Net())
    verify(opt, spec, CPU_MODE)  # what was asked
    with pytest.raises(AssertionError, match="quantize=True"):
        verify(opt, spec, {**CPU_MODE, "quantize": True})
    with pytest.raises(AssertionError, match="fused"):
        verify(opt, spec, {**CPU_MODE, "fused": True})
    bf16 = eager("flash_adamw", Net().to(torch.bfloat16))
    with pytest.raises(AssertionError, match="master_weight_bits=24"):
        verify(bf16, spec, {**CPU_MODE, "master_weight_bits": 24})


def test_build_on_the_meta_device(flashoptim):
    """What `lit-optim estimate` builds: an all-fp32 model asking for 24-bit master weights gets none (flashoptim
    refuses the request there), and every group's initial_lr is its own LR (lr_scales survive a schedule)."""
    spec = lit_optim.get_spec("flash_adamw")
    with torch.device("meta"):
        model = Net()
    plan = build_param_groups(model, lr=1e-3, weight_decay=0.1, lr_scales={"down": 0.1})
    ctor = {"lr": 1e-3, "master_weight_bits": 24, "quantize": False, "fused": False}
    opt = flash.build(plan.groups, spec, ctor)
    verify(opt, spec, ctor)
    assert {g["master_bytewidth"] for g in opt.param_groups} == {0}
    assert [g["initial_lr"] for g in opt.param_groups] == [g["lr"] for g in opt.param_groups]
    assert sorted(g["initial_lr"] for g in opt.param_groups) == pytest.approx([1e-4, 1e-4, 1e-3, 1e-3])
