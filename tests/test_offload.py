"""CPU offload of optimizer state (`optim.offload=cpu`): same numbers as the plain optimizer, exact resume, host state
that stays on the host, and refusals before step 1 for what cannot work.

On a CPU-only machine the "device" is the CPU too, but the host copies, gradient buffers, hooks and state routing are
the same code the GPU runs; the `gpu` tests at the end check what only a GPU can show (memory, async copies).
"""

from __future__ import annotations

import copy
import time
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.optimizer import _optimizer_to_device
from lightning.pytorch.callbacks import Callback

from lit_optim.build import build_optimizer
from lit_optim.errors import HyperparameterError, IncompatibleConfigError
from lit_optim.optimizers.offload import OffloadOptimizer
from lit_optim.state_bytes import state_report
from lit_optim.task.models import build_model
from tests.harness import TINY_MODEL, make_module, resume_matches, run_task, states_equal

SCHEDULE = {"name": "cosine", "warmup_steps": 2}


def _train(model, optimizer, steps: int, seed: int = 1) -> None:
    """A few steps of the tiny LM with a per-step LR schedule (warm-up then decay)."""
    gen = torch.Generator().manual_seed(seed)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 2) * 0.8 ** s)
    for _ in range(steps):
        x = torch.randint(0, 256, (4, 17), generator=gen)
        optimizer.zero_grad()
        logits = model(x[:, :-1])
        torch.nn.functional.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1)).backward()
        optimizer.step()
        sched.step()


def _pair(name: str, offload_gradients: bool = False, **hp):
    torch.manual_seed(0)
    plain_model = build_model(TINY_MODEL)
    off_model = copy.deepcopy(plain_model)
    plain = build_optimizer(plain_model, name, **hp)
    off = build_optimizer(off_model, name, offload="cpu", offload_gradients=offload_gradients, **hp)
    return plain_model, plain, off_model, off


def _params_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


# --- same numbers as the plain optimizer ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adamw_torch", "adamw_torch_fused"])
def test_offloaded_adamw_equals_plain_bit_for_bit(name):
    plain_model, plain, off_model, off = _pair(name, lr=3e-3, weight_decay=0.1)
    assert isinstance(off, OffloadOptimizer) and type(off.inner) is torch.optim.AdamW
    assert {g["name"] for g in off.param_groups} == {"decay", "no_decay"}
    assert [g["weight_decay"] for g in off.param_groups] == [g["weight_decay"] for g in plain.param_groups]
    _train(plain_model, plain, 5)
    _train(off_model, off, 5)
    assert _params_equal(plain_model, off_model)
    assert states_equal(plain, off)
    # Equal parameters under a changing schedule: the inner stepped with the outer groups' learning rate each time.
    assert plain.param_groups[0]["lr"] != 3e-3
    assert off.lit_optim.extra == {"offload": "cpu", "offload_gradients": False}


def test_offloaded_bnb_8bit_equals_plain():
    plain_model, plain, off_model, off = _pair("adamw_8bit", lr=3e-3, weight_decay=0.1)
    _train(plain_model, plain, 4)
    _train(off_model, off, 4)
    assert _params_equal(plain_model, off_model)
    assert states_equal(plain, off)
    qkv = off_model.blocks[0].qkv.weight
    assert off.state[qkv]["state1"].dtype == torch.uint8  # really 8-bit on the host
    # The embedding keeps 32-bit state, as without offload (bitsandbytes resolves that override by the host copy).
    assert off.state[off_model.embed.weight]["state1"].dtype == torch.float32
    assert off.lit_optim.embedding_32bit_params == plain.lit_optim.embedding_32bit_params > 0


def test_state_dict_round_trips_exactly():
    _, _, model, off = _pair("adamw_torch", lr=3e-3, weight_decay=0.1)
    _train(model, off, 3)
    saved = copy.deepcopy(off.state_dict())
    fresh_model = copy.deepcopy(model)
    fresh = build_optimizer(fresh_model, "adamw_torch", lr=3e-3, weight_decay=0.1, offload="cpu")
    fresh.load_state_dict(saved)
    assert states_equal(off, fresh)
    assert all(t.device.type == "cpu" for s in fresh.inner.state.values() for t in s.values())
    _train(model, off, 2, seed=5)
    _train(fresh_model, fresh, 2, seed=5)
    assert _params_equal(model, fresh_model) and states_equal(off, fresh)


def test_lightning_moving_state_to_the_device_cannot_move_host_state():
    """After a resume Lightning calls `_optimizer_to_device(optimizer, root_device)`, which assigns
    ``state[p][key] = tensor.to(device)``; on a GPU that would pull the offloaded state onto the device."""
    _, _, model, off = _pair("adamw_torch", lr=3e-3)
    _train(model, off, 2)
    before = {id(t): t for s in off.inner.state.values() for t in s.values()}
    _optimizer_to_device(off, torch.device("meta"))
    after = [t for s in off.inner.state.values() for t in s.values()]
    assert after and all(t.device.type == "cpu" for t in after)
    assert all(id(t) in before for t in after)  # the very same host tensors
    # state[p] still shows the real state for the device parameter.
    p = model.blocks[0].qkv.weight
    assert off.state[p]["exp_avg"] is off.inner.state[off._host[id(p)]]["exp_avg"]


def test_state_monitor_reports_host_bytes():
    _, _, model, off = _pair("adamw_torch", lr=3e-3)
    _train(model, off, 1)
    report = state_report(off)
    n = sum(p.numel() for p in model.parameters())
    tensors = len(list(model.parameters()))
    assert report.total.params == n and report.total.tensors == tensors  # host copies are not counted as params
    assert report.total.by_location["cpu"] == report.total.bytes == 8 * n + 4 * tensors  # two fp32 moments + step
    assert report.total.by_location["gpu"] == 0
    assert report.buffer_bytes == 2 * 4 * n  # the host copy of every parameter and its gradient


def test_step_timing_monitor_times_the_host_step(tmp_path):
    from lit_optim.callbacks.step_timing import StepTimingMonitor
    from tests.callbacks_support import fit, read_csv

    class SlowInner(Callback):
        def on_train_start(self, trainer, pl_module):
            inner = trainer.optimizers[0].inner
            step = inner.step

            def slow(*a, **kw):
                time.sleep(0.05)
                return step(*a, **kw)

            inner.step = slow

    trainer, _ = fit(tmp_path, {"name": "adamw_torch", "offload": "cpu"}, 6,
                     [StepTimingMonitor(log_every_n_steps=2, warmup_steps=1), SlowInner()], log_every_n_steps=2)
    rows = [r for r in read_csv(trainer) if "timing/optimizer_step_ms" in r]
    assert rows and all(r["timing/optimizer_step_ms"] >= 50 for r in rows)
    assert all(r["timing/forward_backward_ms"] < r["timing/train_step_ms"] for r in rows)


# --- through Lightning ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adamw_torch", "adamw_8bit", "adamw_fused_8bit"])  # fp32 and two low-bit steps
def test_resume_through_lightning_is_exact_and_matches_plain(tmp_path, name):
    optim = {"name": name, "lr": 3e-3, "weight_decay": 0.1, "offload": "cpu"}
    params_equal, state_equal, losses = resume_matches(optim, tmp_path, steps=8, scheduler=SCHEDULE)
    assert params_equal and state_equal
    _, _, plain_losses = run_task({**optim, "offload": None}, 8, scheduler=SCHEDULE)
    assert losses == plain_losses


def test_gradient_clipping_at_level_1_matches_plain():
    optim = {"name": "adamw_torch", "lr": 3e-3}
    plain, tp, _ = run_task(optim, 4, gradient_clip_val=0.05)
    off, to, _ = run_task({**optim, "offload": "cpu"}, 4, gradient_clip_val=0.05)
    unclipped, _, _ = run_task({**optim, "offload": "cpu"}, 4)
    assert isinstance(to.optimizers[0], OffloadOptimizer)
    assert _params_equal(plain, off) and states_equal(tp.optimizers[0], to.optimizers[0])
    assert not _params_equal(off, unclipped)  # the clip really bit


class _DeviceGrads(Callback):
    """The device gradients Lightning sees right before the optimizer update."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.seen.append(sum(p.grad is not None for p in pl_module.parameters()))


def test_offload_gradients_equals_level_1_and_frees_device_grads():
    optim = {"name": "adamw_torch", "lr": 3e-3, "weight_decay": 0.1, "offload": "cpu"}
    level1_grads, level2_grads = _DeviceGrads(), _DeviceGrads()
    level1, t1, _ = run_task(optim, 5, scheduler=SCHEDULE, callbacks=[level1_grads])
    level2, t2, _ = run_task({**optim, "offload_gradients": True}, 5, scheduler=SCHEDULE, callbacks=[level2_grads])
    assert _params_equal(level1, level2) and states_equal(t1.optimizers[0], t2.optimizers[0])
    assert set(level2_grads.seen) == {0}  # every gradient went to the host during backward
    assert set(level1_grads.seen) == {len(list(level1.parameters()))}
    assert t2.optimizers[0].lit_optim.extra["offload_gradients"] is True


# --- refusals -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("trainer_kw", "match"), [
    ({"gradient_clip_val": 1.0}, "offload_gradients=false"),
    ({"accumulate_grad_batches": 2}, "accumulate_grad_batches=2"),
])
def test_trainer_settings_refused_with_gradient_offload_before_step_1(trainer_kw, match):
    optim = {"name": "adamw_torch", "offload": "cpu", "offload_gradients": True}
    with pytest.raises(IncompatibleConfigError, match=match) as err:
        run_task(optim, 2, **trainer_kw)
    assert "adamw_torch" in str(err.value) and "offload" in str(err.value)


def _fake_trainer(strategy, **kw):
    return SimpleNamespace(strategy=strategy, gradient_clip_val=kw.get("clip"), accumulate_grad_batches=1,
                           precision_plugin=SimpleNamespace(scaler=kw.get("scaler")))


def test_strategies_refused():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

    _, _, _, level1 = _pair("adamw_torch")
    _, _, _, level2 = _pair("adamw_torch", offload_gradients=True)
    level1.check_trainer(_fake_trainer(DDPStrategy()))  # DDP reduces before step: fine at level 1
    with pytest.raises(IncompatibleConfigError, match="DDP all-reduces.*offload_gradients=false under DDP"):
        level2.check_trainer(_fake_trainer(DDPStrategy()))
    # Each sharded strategy is pointed at its own CPU offload: FSDP1's flag, FSDP2's offload policy.
    for strategy, own in ((FSDPStrategy(), "cpu_offload=True"), (ModelParallelStrategy(), "CPUOffloadPolicy")):
        with pytest.raises(IncompatibleConfigError, match=f"shards parameters.*{own}"):
            level1.check_trainer(_fake_trainer(strategy))
    with pytest.raises(IncompatibleConfigError, match="16-mixed.*bf16-mixed"):
        level2.check_trainer(_fake_trainer(DDPStrategy(), scaler=object()))


@pytest.mark.parametrize(("name", "hp", "match"), [
    ("adamw_torch", {"offload": "gpu"}, r"offload must be null or one of \['cpu'\]"),
    ("adamw_torch", {"offload": "cpu", "offload_gradients": "yes"}, "offload_gradients must be true or false"),
    ("adamw_torch", {"offload_gradients": True}, "needs offload=cpu"),
    ("adamw_torch", {"offload": "cpu", "in_backward": True}, "in_backward and offload='cpu' cannot be combined"),
    ("paged_adamw_8bit", {"offload": "cpu"}, "paged .*'adamw_8bit' with offload=cpu"),
    ("adamw_fp8", {"offload": "cpu"}, "runs only on CUDA"),
    ("schedule_free_adamw", {"offload": "cpu"}, "schedule-free"),
    ("galore_adamw", {"offload": "cpu"}, "model's structure"),
    ("apollo_mini_layerwise", {"offload": "cpu"}, "steps in backward"),
])
def test_bad_requests_refused_at_build_and_module_construction(name, hp, match):
    from lit_optim.build import resolve_hyperparameters
    from lit_optim.registry import get_spec

    with pytest.raises(HyperparameterError, match=match):
        resolve_hyperparameters(get_spec(name), hp)  # what the mixin runs when the module is constructed
    if name in ("adamw_torch", "paged_adamw_8bit"):  # names that build here: the module refuses at construction
        with pytest.raises(HyperparameterError, match=match):
            make_module({"name": name, **hp})


def test_off_values_are_accepted_by_every_name():
    """The Hydra YAMLs carry `offload: null, offload_gradients: false`; those mean "no offload" anywhere."""
    torch.manual_seed(0)
    opt = build_optimizer(build_model(TINY_MODEL), "adamw_torch", offload=None, offload_gradients=False)
    assert type(opt) is torch.optim.AdamW and "offload" not in opt.lit_optim.extra


def test_hydra_override_without_plus(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lit_optim.hydra_configs import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"output_dir={tmp_path}", "optim=adamw_torch", "optim.offload=cpu"])
    hp = OmegaConf.to_container(cfg.optim, resolve=True)
    torch.manual_seed(0)
    opt = build_optimizer(build_model(TINY_MODEL), **hp)
    assert isinstance(opt, OffloadOptimizer) and opt.lit_optim.extra["offload"] == "cpu"


def test_weights_loaded_after_building_are_used():
    """Lightning builds the optimizer, then restores the weights: the host copies must follow before step 1."""
    torch.manual_seed(0)
    model, other = build_model(TINY_MODEL), build_model(TINY_MODEL)
    off = build_optimizer(model, "sgd", lr=0.0, offload="cpu")
    model.load_state_dict(other.state_dict())
    _train(model, off, 1)
    assert _params_equal(model, other)


# --- on a GPU -------------------------------------------------------------------------------------------------------


def _two_layer(device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 512)).to(device)


@pytest.mark.gpu
@pytest.mark.parametrize("offload_gradients", [False, True])
def test_gpu_offloaded_adamw_matches_plain_and_keeps_state_off_the_device(offload_gradients):
    off_model = _two_layer("cuda")
    plain_model = copy.deepcopy(off_model)
    off = build_optimizer(off_model, "adamw_torch", lr=1e-3, weight_decay=0.1, offload="cpu",
                          offload_gradients=offload_gradients)
    assert off.inner.defaults["fused"] is True  # the fused CPU kernel steps the host state
    gen = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randn(64, 512, device="cuda", generator=gen) for _ in range(10)]
    # cuBLAS allocates its workspace (tens of MiB, counted by the allocator) at the first matmul of the process:
    # make that happen before the baseline, or the first test to run would count it as optimizer state.
    plain_model(batches[0]).square().mean().backward()
    plain_model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    for x in batches:
        off.zero_grad()
        off_model(x).square().mean().backward()
        off.step()
    off.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated() - base
    n = sum(p.numel() for p in off_model.parameters())
    assert grown < 2**20, f"{grown} bytes stayed on the device; plain AdamW state would be {8 * n}"
    plain = build_optimizer(plain_model, "adamw_torch", lr=1e-3, weight_decay=0.1)
    for x in batches:
        plain.zero_grad()
        plain_model(x).square().mean().backward()
        plain.step()
    # Fused CPU and foreach CUDA AdamW round differently: agreement to fp32 rounding over 10 steps.
    for a, b in zip(plain_model.parameters(), off_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    report = state_report(off)
    assert report.total.by_location["gpu"] == 0 and report.total.by_location["cpu"] >= 8 * n
    assert report.buffer_by_location["cpu_pinned"] >= 8 * n  # pinned host copies: the copies are asynchronous


@pytest.mark.gpu
def test_gpu_resume_through_lightning_is_exact(tmp_path):
    optim = {"name": "adamw_torch", "lr": 3e-3, "weight_decay": 0.1, "offload": "cpu"}
    params_equal, state_equal, _ = resume_matches(optim, tmp_path, steps=8, scheduler=SCHEDULE, accelerator="gpu")
    assert params_equal and state_equal


@pytest.mark.gpu
def test_gpu_state_stays_on_host_after_lightning_resume(tmp_path):
    optim = {"name": "adamw_torch", "lr": 3e-3, "offload": "cpu"}
    run_task(optim, 4, tmp_path=tmp_path, checkpoint_every=2, accelerator="gpu")
    _, trainer, _ = run_task(optim, 4, tmp_path=tmp_path / "r", ckpt_path=str(tmp_path / "ckpt" / "step=2.ckpt"),
                             accelerator="gpu")
    inner = trainer.optimizers[0].inner
    # (After fit, Lightning's teardown moves the model to the host: the parameters' device is not checked here.)
    assert all(t.device.type == "cpu" for s in inner.state.values() for t in s.values() if torch.is_tensor(t))


def test_module_builds_offload_through_the_mixin():
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, max_steps=1, enable_progress_bar=False)
    module = make_module({"name": "adamw_torch", "offload": "cpu"})
    module.trainer = trainer
    module.configure_model()  # the task builds its network here, on the device it trains on
    opt = module.configure_optimizers()
    assert isinstance(opt, OffloadOptimizer) and opt.lit_optim.spec.name == "adamw_torch"
