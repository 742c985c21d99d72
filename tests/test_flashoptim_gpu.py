"""The FlashOptim names on a CUDA GPU: each built on a small model and stepped, its state in the bits and dtypes
flashoptim keeps, the monitors' bytes equal to the registry's theory, a checkpoint that loads with
``weights_only=True`` and resumes bit for bit, and a short Lightning run through lit_optim's API.

Needs flashoptim (``pip install -e '.[flashoptim]'``). On a GPU machine:

    python -m pytest -m gpu tests/test_flashoptim_gpu.py

Skipped on CPU; tests/test_flashoptim.py checks there what a CPU can.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from harness import run_task, states_equal
from torch import nn

import lit_optim
from lit_optim.builders.flashoptim import check_built
from lit_optim.callbacks import OptimizerStateMonitor
from lit_optim.registry import availability
from lit_optim.state_bytes import state_bytes_by_param, state_report
from lit_optim.state_theory import expected_state_bytes

pytestmark = pytest.mark.gpu

FLASH = [n for n in lit_optim.list_optimizers() if lit_optim.get_spec(n).backend == "flashoptim"]
# Each name's moments and the dtype of their codes.
ADAM = {"exp_avg": torch.int8, "exp_avg_sq": torch.uint8}
MOMENTS = {"flash_adamw": ADAM, "flash_adam": ADAM, "flash_lion": {"exp_avg": torch.int8},
           "flash_sgd": {"momentum_buffer": torch.int8}, "flash_sgdw": {"momentum_buffer": torch.int8}}
LR = {"flash_sgd": 0.05, "flash_sgdw": 0.05}  # else 1e-3
CORRECTION = {1: torch.int8, 2: torch.int16}


class Net(nn.Module):
    """Linear layers and a LayerNorm, with sizes the 32-value scale groups do and do not divide."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(48, 200)  # weight 9600, bias 200 (6.25 groups: the last one padded)
        self.norm = nn.LayerNorm(200)
        self.down = nn.Linear(200, 48)
        self.head = nn.Linear(48, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.down(torch.relu(self.norm(self.up(x))))
        return self.head(h)


def make(name: str, dtype: torch.dtype, seed: int = 0, **hp):
    torch.manual_seed(seed)
    model = Net().to("cuda", dtype)
    return model, lit_optim.build_optimizer(model, name, **{"lr": LR.get(name, 1e-3), **hp})


def train(model: nn.Module, opt, steps) -> None:
    """One step per index in `steps`, each on its own fixed batch (the same batch for the same index in any run)."""
    dtype = next(model.parameters()).dtype
    for i in steps:
        gen = torch.Generator().manual_seed(1000 + i)
        x = torch.randn(16, 48, generator=gen).to("cuda", dtype)
        y = torch.randint(0, 10, (16,), generator=gen).to("cuda")
        F.cross_entropy(model(x).float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def correction_bytes(dtype: torch.dtype, bits: int | None) -> int:
    return max(0, (bits or 0) // 8 - torch.empty((), dtype=dtype).element_size())


@pytest.mark.parametrize("name", FLASH)
@pytest.mark.parametrize("dtype, bits", [(torch.bfloat16, 24), (torch.bfloat16, 32), (torch.bfloat16, None),
                                         (torch.float32, 24)], ids=["bf16-24", "bf16-32", "bf16-none", "fp32"])
def test_state_bits_dtypes_and_bytes(name, dtype, bits):
    spec = lit_optim.get_spec(name)
    assert availability(spec).ok  # an H100/A100-class GPU: compute capability >= 8.0
    model, opt = make(name, dtype, master_weight_bits=bits)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, range(2))
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))

    # Built as asked (fp32 weights get no correction bits whatever was asked), and verified so.
    extra = correction_bytes(dtype, bits)
    master_bytes = {None: 0, 24: 3, 32: 4}[bits if dtype != torch.float32 else None]
    assert {(g["quantize"], g["master_bytewidth"]) for g in opt.param_groups} == {(True, master_bytes)}
    with pytest.raises(AssertionError):
        check_built(opt, spec, {"quantize": False})

    # The state of every parameter, in flashoptim's layout.
    for p in model.parameters():
        state = opt.state[p]
        for key, code in MOMENTS[name].items():
            moment = state[key]
            assert moment.is_quantized()
            assert moment.quantized.dtype == code and moment.quantized.shape == p.shape and moment.quantized.is_cuda
            assert moment.scales.dtype == torch.float16 and moment.scales.numel() == math.ceil(p.numel() / 32)
        if extra:
            assert state["error_bits"].dtype == CORRECTION[extra] and state["error_bits"].shape == p.shape
        else:
            assert "error_bits" not in state
        assert ("step" in state) == name.startswith("flash_adam")

    # The monitors' bytes: the registry's theory exactly, plus Adam's 8-byte step per parameter.
    measured = state_bytes_by_param(opt)
    steps = 0
    for p in model.parameters():
        step = 8 if "step" in opt.state[p] else 0
        steps += step
        assert measured[p] == expected_state_bytes(opt, p) + step, (name, tuple(p.shape))
    report = state_report(opt)
    params = sum(p.numel() for p in model.parameters())
    assert report.total.bytes == sum(measured.values())
    assert report.total.by_location["gpu"] == report.total.bytes - steps  # the step counters live on the host
    assert report.total.weight_correction_bytes == extra * params
    assert report.metrics()["optim_state/weight_correction_bytes"] == extra * params
    assert report.total.quantized_params == params and report.total.full_precision_params == 0


@pytest.mark.parametrize("name", ["flash_adamw", "flash_lion", "flash_sgd"])
def test_unquantized_moments_keep_the_parameter_dtype(name):
    model, opt = make(name, torch.bfloat16, quantize=False)
    train(model, opt, range(2))
    for p in model.parameters():
        state = opt.state[p]
        for key in MOMENTS[name]:
            assert not state[key].is_quantized() and state[key].data.dtype == torch.bfloat16
        assert state["error_bits"].dtype == torch.int8
        assert state_bytes_by_param(opt)[p] == expected_state_bytes(opt, p) + (8 if "step" in state else 0)
    report = state_report(opt)
    params = sum(p.numel() for p in model.parameters())
    assert report.total.quantized_params == 0 and report.total.full_precision_params == params
    assert report.total.weight_correction_bytes == params


@pytest.mark.parametrize("name", FLASH)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_checkpoint_loads_weights_only_and_resumes_bitwise(name, dtype, tmp_path):
    steps, half = 6, 3
    straight_model, straight = make(name, dtype)
    train(straight_model, straight, range(steps))

    model, opt = make(name, dtype)
    train(model, opt, range(half))
    path = tmp_path / "run.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []
    saved = torch.load(path, weights_only=True, map_location="cpu")

    resumed_model, resumed = make(name, dtype, seed=1)  # another initialisation: everything must come from the file
    resumed_model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["optimizer"])
    assert states_equal(opt, resumed)
    for p in resumed_model.parameters():
        assert all(resumed.state[p][key].quantized.is_cuda for key in MOMENTS[name])
    train(resumed_model, resumed, range(half, steps))

    assert all(torch.equal(a, b) for a, b in zip(straight_model.parameters(), resumed_model.parameters()))
    assert states_equal(straight, resumed)


LIGHTNING_LR = {"flash_adamw": 1e-2, "flash_adam": 1e-2, "flash_lion": 5e-3, "flash_sgd": 0.1, "flash_sgdw": 0.1}


@pytest.mark.parametrize("name", FLASH)
def test_lightning_bf16_run_is_monitored_and_resumes_exactly(name, tmp_path):
    """`lit-optim train`'s path: the task's module (the mixin builds the optimizer), bf16-true weights with 24-bit
    master weights, the state monitor, Lightning's checkpoint, and a resumed fit (loaded with weights_only=True)."""
    optim = {"name": name, "lr": LIGHTNING_LR[name]}
    kw = {"accelerator": "gpu", "precision": "bf16-true"}
    steps = 12
    monitor = OptimizerStateMonitor(log_every_n_steps=1)
    module, trainer, losses = run_task(optim, steps, tmp_path=tmp_path, checkpoint_every=steps // 2,
                                       callbacks=[monitor], **kw)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.2, [round(x, 3) for x in losses]

    opt = trainer.optimizers[0]
    params = [p for p in module.parameters() if p.requires_grad]
    assert {p.dtype for p in params} == {torch.bfloat16}
    assert opt.lit_optim.hyperparameters["master_weight_bits"] == 24
    assert {g["master_bytewidth"] for g in opt.param_groups} == {3}
    metrics = monitor.last_metrics
    steps_bytes = 8 * len(params) if name.startswith("flash_adam") else 0
    assert metrics["optim_state/bytes"] == sum(expected_state_bytes(opt, p) for p in params) + steps_bytes
    assert metrics["optim_state/weight_correction_bytes"] == sum(p.numel() for p in params)
    assert metrics["optim_state/quantized_params"] == metrics["optim_state/trainable_params"]

    resumed, t2, _ = run_task(optim, steps, tmp_path=tmp_path / "resumed",
                              ckpt_path=str(tmp_path / "ckpt" / f"step={steps // 2}.ckpt"), **kw)
    assert all(torch.equal(a, b) for a, b in zip(module.parameters(), resumed.parameters()))
    assert states_equal(opt, t2.optimizers[0])
