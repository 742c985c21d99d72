"""Big models on one GPU: the model built where it trains, pretrained weights loaded straight to the device, the
device-memory budget, time to the first step, and the benchmark driver (its CPU smoke suite)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from harness import TINY_MODEL, make_data, run_task

from lit_optim.errors import (
    HyperparameterError,
    IncompatibleConfigError,
    MissingPathError,
    OutOfDeviceMemoryError,
)
from lit_optim.task.module import LanguageModelTask

ROOT = Path(__file__).resolve().parents[1]
TINY_LLAMA = {"arch": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


def quiet_trainer(tmp_path, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=kw.pop("max_steps", 1), logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=tmp_path, limit_val_batches=0, **kw)


# --- the model is built in configure_model ------------------------------------------------------------------------

def test_model_is_built_in_configure_model_in_the_trainers_precision(tmp_path, monkeypatch):
    """Under bf16-true the weights are *created* in bf16 inside Lightning's contexts (no fp32 model first)."""
    import lit_optim.task.module as module_mod

    seen = []
    real = module_mod.build_model

    def spy(cfg):
        model = real(cfg)
        seen.append((torch.get_default_dtype(), next(model.parameters()).dtype))
        return model

    monkeypatch.setattr(module_mod, "build_model", spy)
    task = LanguageModelTask(model=TINY_MODEL, optim={"name": "adamw_torch", "lr": 1e-3})
    assert task.model is None and not list(task.parameters())  # nothing built, nothing allocated yet
    trainer = quiet_trainer(tmp_path, precision="bf16-true")
    trainer.fit(task, make_data())
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    trainer.fit(task, make_data())  # a second fit reuses the model instead of building another
    assert len(seen) == 1


def test_config_errors_surface_at_construction_without_building():
    with pytest.raises(HyperparameterError, match="Unknown model arch 'gpt'"):
        LanguageModelTask(model={"arch": "gpt"})
    with pytest.raises(HyperparameterError, match="model \\(arch=tiny\\).*d_modle"):
        LanguageModelTask(model={**TINY_MODEL, "d_modle": 3})
    with pytest.raises(HyperparameterError, match="model.dtype='bf16' is not a floating-point torch dtype"):
        LanguageModelTask(model={**TINY_LLAMA, "dtype": "bf16"})
    with pytest.raises(MissingPathError, match="is not a directory"):
        LanguageModelTask(model={**TINY_LLAMA, "pretrained": "/no/such/dir"})


def test_load_from_checkpoint_builds_the_model_and_restores_it(tmp_path):
    module, trainer, _ = run_task({"name": "adamw_torch", "lr": 1e-3}, 2, tmp_path=tmp_path, checkpoint_every=2)
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    loaded = LanguageModelTask.load_from_checkpoint(ckpt, weights_only=True)
    assert loaded.model is not None
    for (name, a), (_, b) in zip(module.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


# --- pretrained weights -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = {k: v for k, v in TINY_LLAMA.items() if k != "arch"}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    single, sharded = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("sharded")
    model.save_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="100KB")  # several files + model.safetensors.index.json
    return model, single, sharded


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_pretrained_loads_exactly_without_random_init(saved_llama, layout, monkeypatch):
    from lit_optim.task.pretrained import load_pretrained

    model, single, sharded = saved_llama
    path = single if layout == "single" else sharded
    if layout == "sharded":
        assert len(list(path.glob("*.safetensors"))) > 1 and (path / "model.safetensors.index.json").exists()
    # Random init is skipped: an init function that ran would be noticed.
    monkeypatch.setattr(torch.nn.init, "normal_", lambda *a, **k: pytest.fail("weights were initialised"))
    loaded = load_pretrained(str(path), dtype=torch.float32)
    assert loaded.training
    tokens = torch.randint(0, 256, (2, 16))
    model.eval(), loaded.eval()
    with torch.no_grad():  # same logits: every weight and buffer (rotary frequencies) is right
        assert torch.equal(model(tokens).logits, loaded(tokens).logits)


def test_pretrained_in_bf16_is_the_checkpoint_rounded(saved_llama):
    from lit_optim.task.pretrained import load_pretrained

    model, single, _ = saved_llama
    loaded = load_pretrained(str(single), dtype=torch.bfloat16)
    real = model.state_dict()
    for key, value in loaded.state_dict().items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, real[key].to(torch.bfloat16)), key


def test_incomplete_checkpoint_is_refused_by_name(saved_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    from lit_optim.task.pretrained import load_pretrained

    _, single, _ = saved_llama
    state = load_file(single / "model.safetensors")
    state.pop("model.layers.1.mlp.down_proj.weight")
    (tmp_path / "config.json").write_text((single / "config.json").read_text())
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MissingPathError, match="lacks 1 of the model's tensors.*down_proj"):
        load_pretrained(str(tmp_path), dtype=torch.float32)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(MissingPathError, match="no \\*.safetensors files"):
        load_pretrained(str(tmp_path), dtype=torch.float32)


# --- the device-memory budget ---------------------------------------------------------------------------------------

def test_budget_is_refused_before_training_off_the_gpu_and_when_malformed(tmp_path):
    from lit_optim.callbacks.memory_budget import DeviceMemoryBudget

    for bad in (0, -1, "40", True):
        with pytest.raises(HyperparameterError, match="max_device_memory_gib must be a positive number"):
            DeviceMemoryBudget(bad)
    task = LanguageModelTask(model=TINY_MODEL, optim="adamw_torch")
    trainer = quiet_trainer(tmp_path, callbacks=[DeviceMemoryBudget(40)])
    with pytest.raises(IncompatibleConfigError, match="max_device_memory_gib=40 caps CUDA memory.*'cpu'"):
        trainer.fit(task, make_data())
    assert task.model is None  # refused in setup, before the model was built


def test_out_of_memory_becomes_one_line_naming_the_budget(tmp_path, monkeypatch):
    """`lit-optim train` turns an OOM into OutOfDeviceMemoryError (exit status 3) with the budget and the way out."""
    from test_recipes import compose_recipe

    from lit_optim import train as train_mod

    cfg = compose_recipe("tiny_lm_8bit_vs_fp32", tmp_path, "logger=csv", "trainer.max_steps=2",
                         "trainer.enable_progress_bar=false")

    def fit(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    module, datamodule, trainer = train_mod.build_run(cfg)
    monkeypatch.setattr(train_mod, "build_run", lambda c: (module, datamodule, trainer))
    monkeypatch.setattr(trainer, "fit", fit)
    cfg.max_device_memory_gib = 40
    with pytest.raises(OutOfDeviceMemoryError) as info:
        train_mod.train(cfg)
    message = str(info.value)
    assert "does not fit the 40 GiB device-memory budget (max_device_memory_gib=40)" in message
    assert "paged_adamw_8bit" in message and "\n" not in message
    assert info.value.exit_code == 3


# --- time to the first step -----------------------------------------------------------------------------------------

def test_launch_to_first_step_is_logged_once(tmp_path):
    from lit_optim.callbacks import StepTimingMonitor
    from lit_optim.callbacks.step_timing import process_age_s

    monitor = StepTimingMonitor(log_every_n_steps=1, warmup_steps=1)
    logged = []
    monitor.publish = lambda trainer, metrics, step=None: logged.append(dict(metrics))
    run_task({"name": "adamw_torch", "lr": 1e-3}, 3, tmp_path=tmp_path, callbacks=[monitor])
    launch = [m["timing/launch_to_first_step_s"] for m in logged if "timing/launch_to_first_step_s" in m]
    assert len(launch) == 1 and 0 < launch[0] <= process_age_s()


# --- the benchmark driver -------------------------------------------------------------------------------------------

def test_big_models_driver_smoke(tmp_path):
    """The driver's CPU suite: one real `lit-optim train` process read back from its CSV, one refused budget."""
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "big_models.py"), "--suite", "tiny",
                           "--workdir", str(tmp_path / "runs"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ok, budget = json.loads(out.read_text())["rows"]
    assert ok["exit"] == 0 and ok["error"] is None
    assert 0 < ok["launch_to_first_step_s"] < ok["wall_s"]
    assert ok["state_b_per_param"] == pytest.approx(8.0, abs=0.01) and math.isfinite(ok["tokens_per_s"])
    assert ok["host_rss_gib"] > 0.1
    assert budget["exit"] == 2 and "max_device_memory_gib=40 caps CUDA memory" in budget["error"]
    assert "| tiny adamw_torch | 0 |" in proc.stdout


# --- on the GPU -----------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_model_is_created_on_the_device_and_pretrained_loads_there(saved_llama, tmp_path):
    from lit_optim.callbacks.device_memory import host_rss_bytes

    _, single, _ = saved_llama
    before = host_rss_bytes()
    big = {**TINY_LLAMA, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 8, "vocab_size": 32000,
           "num_attention_heads": 16, "num_key_value_heads": 8, "dtype": "bfloat16"}  # ~0.6B params, 1.2 GB bf16
    task = LanguageModelTask(model=big, optim={"name": "adamw_torch_fused", "lr": 1e-4})
    seen = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            # Read while training: Lightning's teardown moves the model to the host after fit.
            seen["rss"] = host_rss_bytes()
            seen["ok"] = all(p.is_cuda and p.dtype == torch.bfloat16 for p in pl_module.parameters())

    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-true", max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                        default_root_dir=tmp_path, callbacks=[Probe()])
    trainer.fit(task, make_data(vocab_size=32000, batch_size=1))
    assert seen["ok"]
    # Built on the GPU: the host never held the 1.2 GB of weights.
    assert seen["rss"] - before < 0.5 * 2**30
    pre = LanguageModelTask(model={**TINY_LLAMA, "pretrained": str(single), "dtype": "bfloat16"})
    seen.clear()
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-true", max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                        default_root_dir=tmp_path, callbacks=[Probe()])
    trainer.fit(pre, make_data(batch_size=1))
    assert seen["ok"]


@pytest.mark.gpu
def test_gpu_budget_caps_the_allocator_and_is_lifted_after(tmp_path):
    from lit_optim.callbacks.memory_budget import DeviceMemoryBudget

    task = LanguageModelTask(model=TINY_MODEL, optim="adamw_torch")
    budget = DeviceMemoryBudget(1)

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            with pytest.raises(torch.OutOfMemoryError):
                torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")  # 2 GiB under a 1 GiB cap

    trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, default_root_dir=tmp_path,
                        callbacks=[budget, Probe()])
    trainer.fit(task, make_data())
    torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")  # the cap is gone after the fit


def test_cli_run_frees_the_model_after_fit_and_keeps_everything_written(tmp_path, monkeypatch):
    """`lit-optim train` ends with the fit: the weights and optimizer state are freed on the device before Lightning's
    teardown would copy them to the host, after the last checkpoint and the metrics are written."""
    from test_recipes import compose_recipe

    from lit_optim import train as train_mod

    cfg = compose_recipe("tiny_lm_8bit_vs_fp32", tmp_path, "logger=csv", "trainer.max_steps=2", "optim=adamw_torch",
                         "trainer.enable_progress_bar=false", "callbacks.checkpoint.every_n_train_steps=2")
    built = {}
    real = train_mod.build_run

    def keep(c):
        built["run"] = real(c)
        return built["run"]

    monkeypatch.setattr(train_mod, "build_run", keep)
    metrics = train_mod.train(cfg)
    module, _, trainer = built["run"]
    assert all(p.numel() == 0 for p in module.parameters())
    assert all(not opt.state for opt in trainer.optimizers)
    assert math.isfinite(metrics["train/loss"])
    (ckpt,) = (tmp_path / "checkpoints").glob("*step=2.ckpt")
    state = torch.load(ckpt, weights_only=True)
    assert state["state_dict"] and all(t.numel() > 0 for t in state["state_dict"].values())
    assert state["optimizer_states"][0]["state"]
    assert list((tmp_path / "csv").rglob("metrics.csv"))
