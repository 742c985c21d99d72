"""lit_optim in a Fabric loop: optimizers built by name, `fabric.setup`, `fabric.save`/`fabric.load` resuming exactly,
and what the README's Fabric section says a loop must do itself (schedule-free modes, in-backward's stepping window,
the state report in place of the monitors). The README's own example runs in tests/test_docs.py."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from checkpoint_support import flat_state, same

import lit_optim
from lit_optim.state_bytes import state_report

# Kinds with no compile on the first step; torchao's resume through Fabric is in tests/test_checkpoint_paths.py.
NAMES = {
    "adamw_torch": {},
    "adamw_8bit": {},
    "galore_adamw": {"rank": 4},
    "galore_adamw_layerwise": {"rank": 4},  # in backward: stepped through optimizer.step(closure)
    "schedule_free_adamw": {},
}


def setup(fabric, name: str):
    torch.manual_seed(0)
    # 4096-element weights: bitsandbytes and torchao quantize their state.
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))
    optimizer = lit_optim.build_optimizer(model, name, lr=1e-2, **NAMES[name])
    model, optimizer = fabric.setup(model, optimizer)
    return {"model": model, "optimizer": optimizer, "step": 0}


def train(fabric, state, until: int) -> None:
    model, optimizer = state["model"], state["optimizer"]
    if optimizer.lit_optim.spec.train_eval_switch:
        optimizer.train()
    while state["step"] < until:
        x = torch.randn(8, 32, generator=torch.Generator().manual_seed(state["step"]))

        def closure(x=x):
            loss = torch.nn.functional.mse_loss(model(x), x.flip(-1))
            fabric.backward(loss)
            return loss

        optimizer.step(closure)
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
    if optimizer.lit_optim.spec.train_eval_switch:
        optimizer.eval()  # the weights that are evaluated and saved


@pytest.mark.parametrize("name", [n for n in NAMES if n != "schedule_free_adamw"] + [
    pytest.param("schedule_free_adamw", marks=pytest.mark.skipif(
        not __import__("importlib").util.find_spec("schedulefree"), reason="schedulefree is not installed"))])
def test_save_and_load_resume_exactly(name, tmp_path):
    fabric = L.Fabric(accelerator="cpu", devices=1)
    straight = setup(fabric, name)
    train(fabric, straight, 3)
    fabric.save(tmp_path / "half.ckpt", straight)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / "half.ckpt")) == []
    train(fabric, straight, 6)

    resumed = setup(fabric, name)
    fabric.load(tmp_path / "half.ckpt", resumed)
    assert resumed["step"] == 3
    train(fabric, resumed, 6)
    assert all(torch.equal(a, b) for a, b in zip(straight["model"].parameters(), resumed["model"].parameters()))
    assert same(flat_state(straight["optimizer"]), flat_state(resumed["optimizer"]))


def test_in_backward_through_the_fabric_wrapper():
    """`with optimizer.stepping():` and `pop_grad_norm()` on the optimizer `fabric.setup` returns reach the real one:
    each parameter steps in backward and its gradient is freed there."""
    fabric = L.Fabric(accelerator="cpu", devices=1)
    state = setup(fabric, "galore_adamw_layerwise")
    model, optimizer = state["model"], state["optimizer"]
    before = [p.detach().clone() for p in model.parameters()]
    with optimizer.stepping():
        fabric.backward(model(torch.randn(8, 32)).pow(2).mean())
    assert all(p.grad is None for p in model.parameters())  # consumed in backward
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    optimizer.step()
    norm = optimizer.pop_grad_norm()
    assert norm is not None and float(norm) > 0 and optimizer.pop_grad_norm() is None


def test_state_report_of_the_fabric_optimizer():
    """What OptimizerStateMonitor logs, computed on the optimizer `fabric.setup` returns: the same as on the real
    one."""
    fabric = L.Fabric(accelerator="cpu", devices=1)
    state = setup(fabric, "adamw_8bit")
    train(fabric, state, 1)
    metrics = state_report(state["optimizer"]).metrics()
    assert metrics == state_report(state["optimizer"].optimizer).metrics()
    assert metrics["optim_state/quantized_params"] > 0 and 1 < metrics["optim_state/bytes_per_param"] < 4
    assert state["optimizer"].lit_optim.record()["name"] == "adamw_bnb_8bit"  # the canonical name of adamw_8bit
