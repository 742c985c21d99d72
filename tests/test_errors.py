"""Every configuration error arrives before step 1, says what is wrong, and names the fix.

Errors caught when the module is constructed (name, backend, device, hyperparameters) are shown on the constructor;
errors that need the Trainer (strategy, clipping, accumulation, a schedule's length) are shown with a real
`Trainer.fit` that ends with `global_step == 0` and no checkpoint on disk.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import replace

import lightning as L
import pytest
import torch
from harness import TINY_MODEL, make_data, make_module, python_without, temporary_spec
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import lit_optim
from lit_optim.build import check_available
from lit_optim.errors import (
    BackendNotInstalledError,
    DeviceRequirementError,
    HyperparameterError,
    IncompatibleConfigError,
    LitOptimError,
    UnknownOptimizerError,
    UnsupportedOptimizerError,
)
from lit_optim.hf_names import OUT_OF_SCOPE
from lit_optim.mixin import check_trainer_compatibility
from lit_optim.spec import CPU, DDP, FSDP2, GRAD_ACCUM, GRAD_CLIP
from lit_optim.task.module import LanguageModelTask

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")


def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64))


@pytest.fixture
def no_process_group():
    """DDP / FSDP2 runs initialise a process group in this process; leave none behind for other tests."""
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def fit_must_fail(tmp_path, optim, error, match, *, module=None, **trainer_kw):
    """A real `Trainer.fit` that must stop with `error` before the first optimizer step and before any checkpoint."""
    ckpt_dir = tmp_path / "ckpt"
    trainer = L.Trainer(
        max_steps=trainer_kw.pop("max_steps", 4), accelerator="cpu", devices=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=str(tmp_path), callbacks=[ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=1)],
        **trainer_kw,
    )
    module = module or make_module(optim)
    with pytest.raises(error, match=match):
        trainer.fit(module, make_data())
    assert trainer.global_step == 0
    assert not list(tmp_path.rglob("*.ckpt")), "a checkpoint was written before the error"
    return trainer


# --- unknown and unsupported names ------------------------------------------------------------------------------


def test_unknown_name_fails_at_build_and_at_module_construction():
    with pytest.raises(UnknownOptimizerError, match=r"Did you mean: .*paged_adamw_8bit"):
        lit_optim.build_optimizer(small_model(), "paged_adamw_8bt")
    with pytest.raises(UnknownOptimizerError, match=r"Did you mean: .*adamw_torch"):
        LanguageModelTask(model=TINY_MODEL, optim={"name": "adamw_torhc", "lr": 1e-3})


@pytest.mark.parametrize("name", sorted(OUT_OF_SCOPE))
def test_hf_names_lit_optim_does_not_wrap_give_the_reason(name):
    with pytest.raises(UnsupportedOptimizerError) as err:
        lit_optim.build_optimizer(small_model(), name)
    message = str(err.value)
    assert name in message and OUT_OF_SCOPE[name] in message
    # The reason names the package it would need and a lit_optim name to use instead, which really exists.
    assert re.search(r"torch_xla|torch_npu|torchdistx|grokadamw", message)
    alternatives = re.findall(r"'([a-z0-9_]+)'", OUT_OF_SCOPE[name])
    assert alternatives and all(lit_optim.get_spec(a) for a in alternatives)
    with pytest.raises(UnsupportedOptimizerError):
        LanguageModelTask(model=TINY_MODEL, optim=name)


# --- backend not installed ---------------------------------------------------------------------------------------


def test_backend_not_installed_names_the_pip_command(tmp_path):
    """A real missing package: a fresh interpreter whose import path lacks `schedulefree` entirely."""
    result = python_without(("schedulefree",), textwrap.dedent("""
        import importlib.util, torch
        import lit_optim
        from lit_optim.task.module import LanguageModelTask
        assert importlib.util.find_spec("schedulefree") is None
        try:
            import schedulefree
        except ImportError:
            print("IMPORT-FAILS")
        assert "schedule_free_adamw" in lit_optim.list_optimizers()   # listing never imports a backend
        print("DESCRIBE", lit_optim.describe("schedule_free_adamw").splitlines()[2])
        for attempt in ("build", "module"):
            try:
                if attempt == "build":
                    lit_optim.build_optimizer(torch.nn.Linear(4, 4), "schedule_free_adamw", lr=1e-3)
                else:
                    LanguageModelTask(optim={"name": "schedule_free_sgd", "lr": 1.0})
            except lit_optim.BackendNotInstalledError as err:
                assert isinstance(err, ImportError)
                print("ERROR", attempt, err)
        # Other backends are untouched.
        print("BUILT", type(lit_optim.build_optimizer(torch.nn.Linear(4, 4), "adamw_torch")).__name__)
    """), tmp_path)
    out = result.stdout
    assert result.returncode == 0, result.stderr[-3000:]
    assert "IMPORT-FAILS" in out
    assert "unavailable here: schedulefree not installed: pip install 'lit-optim[schedulefree]'" in out
    for attempt, name in (("build", "schedule_free_adamw"), ("module", "schedule_free_sgd")):
        line = next(ln for ln in out.splitlines() if ln.startswith(f"ERROR {attempt}"))
        assert f"{name!r} needs the 'schedulefree' package" in line
        assert "pip install 'lit-optim[schedulefree]'" in line and "pip install schedulefree" in line
    assert "BUILT AdamW" in out


# --- device ------------------------------------------------------------------------------------------------------


GPU_ONLY = [n for n in lit_optim.list_optimizers()
            if lit_optim.get_spec(n).requires_cuda or CPU not in lit_optim.get_spec(n).supports]


@no_cuda
@pytest.mark.parametrize("name", GPU_ONLY)
def test_gpu_only_name_without_cuda(name):
    with pytest.raises(DeviceRequirementError, match="runs only on a CUDA GPU and this machine has none"):
        lit_optim.build_optimizer(small_model(), name)
    with pytest.raises(DeviceRequirementError, match="CUDA"):
        LanguageModelTask(model=TINY_MODEL, optim=name)


@pytest.mark.parametrize("name", GPU_ONLY)
def test_gpu_only_name_refused_on_a_cpu_trainer(name):
    """Even where CUDA exists, a Trainer on CPU is refused before any step (the Trainer-time check)."""
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    with pytest.raises(IncompatibleConfigError, match="runs only on CUDA but the model is on 'cpu'"):
        check_trainer_compatibility(lit_optim.get_spec(name), trainer, "cpu")


@pytest.mark.parametrize("name", ["adamw_fp8", "adam_fp8"])
def test_fp8_below_compute_capability_8_9(name, monkeypatch):
    """The capability check with a monkeypatched device (an Ampere A6000, 8.6); a GPU test covers real devices."""
    spec = lit_optim.get_spec(name)
    assert spec.min_compute_capability == (8, 9)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA RTX A6000")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 6))
    with pytest.raises(DeviceRequirementError) as err:
        check_available(spec)
    message = str(err.value)
    assert "compute capability >= 8.9" in message and "is 8.6" in message and "A6000" in message
    assert "'adamw_torch_8bit'" in message  # the fix
    for ok in ((8, 9), (9, 0), (10, 0)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, ok=ok: ok)
        check_available(spec)  # no error at or above 8.9


@pytest.mark.gpu
def test_fp8_on_this_gpu():
    model = small_model().cuda()
    if torch.cuda.get_device_capability() < (8, 9):
        with pytest.raises(DeviceRequirementError, match="compute capability >= 8.9"):
            lit_optim.build_optimizer(model, "adamw_fp8")
        return
    opt = lit_optim.build_optimizer(model, "adamw_fp8", lr=1e-3)
    model(torch.randn(4, 64, device="cuda")).square().mean().backward()
    opt.step()
    assert type(opt).__name__ == "AdamWFp8"


# --- hyperparameters ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, hp, match", [
    ("adamw_torch", {"betaz": (0.9, 0.95)}, r"does not take hyperparameter 'betaz'\. Did you mean betas\?"),
    ("adamw_torch_8bit", {"block_sise": 128}, r"does not take hyperparameter 'block_sise'\. Did you mean block_size"),
    ("adamw_bnb_8bit", {"momentum": 0.9}, r"does not take hyperparameter 'momentum'"),
    ("sgd", {"betas": (0.9, 0.99)}, r"does not take hyperparameter 'betas'"),
])
def test_hyperparameter_the_optimizer_does_not_take(name, hp, match):
    with pytest.raises(HyperparameterError, match=match) as err:
        lit_optim.build_optimizer(small_model(), name, **hp)
    assert "It takes:" in str(err.value) and "lr" in str(err.value)
    with pytest.raises(HyperparameterError, match=match):
        LanguageModelTask(model=TINY_MODEL, optim={"name": name, **hp})


@pytest.mark.parametrize("name, hp, expected", [
    ("adamw_torch", {"lr": "fast"}, "a number"),
    ("adamw_torch", {"betas": 0.9}, "a list of 2 values"),
    ("adamw_torch", {"betas": (0.9,)}, "a list of 2 values"),
    ("adamw_torch", {"betas": ("a", "b")}, "a list of 2 numbers"),
    ("adamw_torch", {"amsgrad": "yes"}, "true or false"),
    ("adamw_torch_8bit", {"block_size": "big"}, "a number"),
    ("adamw_bnb_8bit", {"weight_decay": True}, "a number"),
])
def test_hyperparameter_of_the_wrong_type(name, hp, expected):
    key = next(iter(hp))
    with pytest.raises(HyperparameterError, match=f"{key}=.* has the wrong type; expected {expected}"):
        lit_optim.build_optimizer(small_model(), name, **hp)
    with pytest.raises(HyperparameterError, match="wrong type"):
        LanguageModelTask(model=TINY_MODEL, optim={"name": name, **hp})


def test_negative_lr_and_bad_group_options():
    with pytest.raises(HyperparameterError, match="learning rate must be >= 0"):
        lit_optim.build_optimizer(small_model(), "adamw_torch", lr=-1e-3)
    with pytest.raises(HyperparameterError, match="match no trainable parameter"):
        lit_optim.build_optimizer(small_model(), "adamw_torch", lr_scales={"embedding": 0.1})
    with pytest.raises(HyperparameterError, match="non-negative finite number"):
        lit_optim.build_optimizer(small_model(), "adamw_torch", lr_scales={"0": -1})
    with pytest.raises(HyperparameterError, match="needs a 'name'"):
        LanguageModelTask(model=TINY_MODEL, optim={"lr": 1e-3})


@pytest.mark.parametrize("name, key, value", [
    ("adamw_bnb_8bit", "optim_bits", 32),
    ("paged_adamw_8bit", "is_paged", False),
    ("adamw_32bit", "optim_bits", 8),
    ("rmsprop_bnb", "optim_bits", 8),
    ("adamw_torch_fused", "fused", False),
])
def test_name_fixed_argument_cannot_be_overridden(name, key, value):
    with pytest.raises(HyperparameterError, match=f"{name!r} fixes {key}=.*cannot be set to {value!r}"):
        lit_optim.build_optimizer(small_model(), name, **{key: value})
    with pytest.raises(HyperparameterError, match="fixes"):
        LanguageModelTask(model=TINY_MODEL, optim={"name": name, key: value})


def test_name_fixed_argument_may_be_restated():
    opt = lit_optim.build_optimizer(small_model(), "adamw_bnb_8bit", optim_bits=8, is_paged=False)
    assert opt.args.optim_bits == 8 and not opt.is_paged


# --- combinations refused at Trainer time ------------------------------------------------------------------------


def without(feature: str):
    """A test spec: PyTorch AdamW that declares it lacks `feature`."""
    spec = lit_optim.get_spec("adamw_torch")
    return replace(spec, name=f"test_adamw_without_{feature}", aliases=(), supports=spec.supports - {feature})


def test_gradient_clipping_refused_before_step_1(tmp_path):
    with temporary_spec(without(GRAD_CLIP)) as spec:
        fit_must_fail(tmp_path, {"name": spec.name}, IncompatibleConfigError,
                      "cannot use Trainer\\(gradient_clip_val=...\\); remove gradient clipping", gradient_clip_val=1.0)
    # The same Trainer settings with an optimizer that supports clipping do step and checkpoint.
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, gradient_clip_val=1.0,
                        callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "ok"), every_n_train_steps=1)])
    trainer.fit(make_module({"name": "adamw_torch"}), make_data())
    assert trainer.global_step == 1 and list((tmp_path / "ok").glob("*.ckpt"))


def test_gradient_accumulation_refused_before_step_1(tmp_path):
    with temporary_spec(without(GRAD_ACCUM)) as spec:
        fit_must_fail(tmp_path, {"name": spec.name}, IncompatibleConfigError,
                      "cannot accumulate gradients; set accumulate_grad_batches=1", accumulate_grad_batches=2)


def test_ddp_refused_before_step_1(tmp_path, no_process_group):
    with temporary_spec(without(DDP)) as spec:
        fit_must_fail(tmp_path, {"name": spec.name}, IncompatibleConfigError, "does not support DDP",
                      strategy="ddp")


# The built-in task under FSDP2 (Lightning's ModelParallelStrategy, which also runs on CPU): configure_model builds
# the model on the device and shards it (lit_optim.task.fsdp2).
ShardedTask = LanguageModelTask


def test_fsdp_refused_for_bitsandbytes_before_step_1(tmp_path, no_process_group):
    """A real spec without FSDP support (bitsandbytes 8-bit) under a real FSDP2 fit on CPU."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    assert FSDP2 not in lit_optim.get_spec("adamw_bnb_8bit").supports
    module = ShardedTask(model=TINY_MODEL, optim={"name": "adamw_bnb_8bit"})
    fit_must_fail(tmp_path, None, IncompatibleConfigError, "does not support FSDP", module=module,
                  strategy=ModelParallelStrategy())


@pytest.mark.gpu
def test_fsdp1_strategy_refused_on_gpu(tmp_path, no_process_group):
    """Lightning's FSDPStrategy (strategy="fsdp") needs a GPU; the same refusal through it."""
    trainer = L.Trainer(max_steps=2, accelerator="gpu", devices=1, strategy="fsdp", logger=False,
                        enable_progress_bar=False, limit_val_batches=0, default_root_dir=str(tmp_path))
    with pytest.raises(IncompatibleConfigError, match="does not support FSDP"):
        trainer.fit(make_module({"name": "paged_adamw_8bit"}), make_data())
    assert trainer.global_step == 0 and not list(tmp_path.rglob("*.ckpt"))


def test_fsdp_check_with_a_real_fsdp_trainer_object():
    from lightning.pytorch.strategies import ModelParallelStrategy

    trainer = L.Trainer(strategy=ModelParallelStrategy(), accelerator="cpu", devices=1, logger=False)
    for name in ("adamw_bnb_8bit", "paged_adamw_32bit", "lion_8bit"):
        with pytest.raises(IncompatibleConfigError, match="does not support FSDP"):
            check_trainer_compatibility(lit_optim.get_spec(name), trainer, "cpu")
    check_trainer_compatibility(lit_optim.get_spec("adamw_torch"), trainer, "cpu")  # torch's AdamW steps FSDP2 shards
    # torchao's 8-bit/4-bit Adam: one precision per parameter, no AOTAutograd cache in DTensor steps, a cache per rank
    for name in ("adamw_torch_8bit", "adamw_torch_4bit", "adam_torch_8bit", "adam_torch_4bit"):
        check_trainer_compatibility(lit_optim.get_spec(name), trainer, "cpu")
    # FP8 needs CUDA >= 8.9 and its FSDP2 path has not run on GPUs: still refused, with that reason
    with pytest.raises(IncompatibleConfigError, match="has not been run on GPUs"):
        check_trainer_compatibility(lit_optim.get_spec("adamw_fp8"), trainer, "cuda")


def test_every_problem_is_reported_at_once():
    spec = replace(lit_optim.get_spec("adamw_torch"), supports=frozenset({CPU}))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, gradient_clip_val=1.0, accumulate_grad_batches=4)
    with pytest.raises(IncompatibleConfigError) as err:
        check_trainer_compatibility(spec, trainer, "cpu")
    assert "gradient_clip_val" in str(err.value) and "accumulate_grad_batches=1" in str(err.value)


def test_schedule_without_a_finite_length_refused_before_step_1(tmp_path):
    module = make_module({"name": "adamw_torch"}, scheduler={"name": "cosine", "warmup_steps": 2})
    fit_must_fail(tmp_path, None, HyperparameterError, "needs a finite number of steps", module=module,
                  max_steps=-1, max_epochs=-1)


def test_all_errors_share_a_base_class():
    for cls in (UnknownOptimizerError, UnsupportedOptimizerError, BackendNotInstalledError, DeviceRequirementError,
                HyperparameterError, IncompatibleConfigError):
        assert issubclass(cls, LitOptimError)
