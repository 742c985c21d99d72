"""Every recipe in recipes/ (found by globbing, so a new one is covered without editing this file) composes, documents
itself, ships in the package, and trains for two optimizer steps through `lit_optim.train.train` -- shrunk to a tiny
model on CPU, with everything else (optimizer, schedule, precision, data module, callbacks) as the recipe has it.

Llama recipes need the transformers extra and skip with that reason without it.
"""

from __future__ import annotations

import importlib.util
import math
import re
from importlib import resources
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

from lit_optim.train import train

RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"
RECIPES = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
SEED = {f"llama31_8b_{name}": name for name in ("adamw_torch", "paged_adamw_32bit", "adamw_8bit", "paged_adamw_8bit")}
HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None

TINY_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 256}
TINY_LM = {"d_model": 64, "n_layers": 2, "n_heads": 2, "max_seq_len": 32, "vocab_size": 256}


def compose_recipe(name: str, tmp_path: Path, *overrides: str, hydra_node: bool = False):
    def run():
        return compose("train", overrides=[f"recipe={name}", f"output_dir={tmp_path}", *overrides],
                       return_hydra_config=hydra_node)

    if GlobalHydra.instance().is_initialized():
        return run()
    with initialize_config_module("lit_optim.conf", version_base="1.3"):
        return run()


@pytest.fixture(scope="module", autouse=True)
def hydra_initialized():
    """One Hydra initialization for the module (it costs more than a compose)."""
    with initialize_config_module("lit_optim.conf", version_base="1.3"):
        yield


def test_recipes_exist_and_ship_in_the_package():
    assert set(SEED) <= set(RECIPES)
    shipped = {Path(p.name).stem for p in (resources.files("lit_optim.conf") / "recipe").iterdir()
               if p.name.endswith(".yaml")}
    assert shipped == set(RECIPES), "the `recipe` group Hydra sees differs from recipes/*.yaml"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_documents_itself(name):
    text = (RECIPE_DIR / f"{name}.yaml").read_text()
    lines = text.splitlines()
    assert lines[0] == "# @package _global_", "a recipe sets keys of every group, so it must be _global_"
    header = lines[: lines.index("defaults:") if "defaults:" in lines else len(lines)]
    assert any(re.fullmatch(rf"#\s+lit-optim train (-m )?recipe={name}( .*)?", line) for line in header), (
        f"the header must show the exact command: lit-optim train recipe={name} ...")
    assert sum(line.startswith("# --- ") for line in lines) >= 2, "section comments (# --- ...) missing"


def test_seed_experiment_recipes(tmp_path):
    """Llama-3.1-8B, seq 512, batch 1 x 32 accumulation, lr 1e-5, 10% warmup, linear, bf16, checkpointing."""
    composed = {}
    for name, optim in SEED.items():
        cfg = compose_recipe(name, tmp_path)
        assert cfg.optim.name == optim
        assert (cfg.model.arch, cfg.model.hidden_size, cfg.model.num_hidden_layers, cfg.model.vocab_size) == (
            "llama", 4096, 32, 128256)
        assert cfg.model.gradient_checkpointing is True and cfg.model.pretrained is None
        assert (cfg.data.seq_len, cfg.data.batch_size, cfg.data.path) == (512, 1, None)
        assert cfg.data._target_.endswith("TextFileDataModule")
        assert cfg.trainer.accumulate_grad_batches == 32
        assert cfg.trainer.precision in ("bf16-true", "bf16-mixed")
        assert cfg.optim.lr == 1e-5
        assert (cfg.scheduler.name, cfg.scheduler.warmup_ratio, cfg.scheduler.min_lr_ratio) == ("linear", 0.1, 0.0)
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == 1
        plain = OmegaConf.to_container(cfg, resolve=True)
        plain["optim"] = {k: v for k, v in plain["optim"].items() if k in ("lr", "weight_decay", "betas", "eps")}
        plain["logger"].pop("name")
        composed[name] = plain
    first, *others = composed.values()
    for name, plain in zip(list(composed)[1:], others):
        assert plain == first, f"{name} differs from the other seed recipes in more than the optimizer"


def test_sweep_recipe_sweeps_over_optimizers(tmp_path):
    cfg = compose_recipe("tiny_lm_8bit_vs_fp32", tmp_path, hydra_node=True)
    swept = cfg.hydra.sweeper.params.optim.split(",")
    assert "adamw_torch" in swept and len(swept) >= 2
    for optim in swept:  # each job of `lit-optim train -m recipe=tiny_lm_8bit_vs_fp32` composes
        assert compose_recipe("tiny_lm_8bit_vs_fp32", tmp_path, f"optim={optim}").optim.name == optim


def shrink(cfg) -> None:
    """Tiny model and data, CPU, 2 optimizer steps of 2 micro-batches; the recipe's other choices stay."""
    with open_dict(cfg):
        cfg.model.update(TINY_LLAMA if cfg.model.arch == "llama" else TINY_LM)
        cfg.data.seq_len = 32
        cfg.data.batch_size = min(int(cfg.data.batch_size), 4)
        for key, tokens in (("train_tokens", 4096), ("val_tokens", 512), ("synthetic_train_tokens", 4096),
                            ("synthetic_val_tokens", 512)):
            if key in cfg.data:
                cfg.data[key] = tokens
        cfg.trainer.update(accelerator="cpu", devices=1, strategy="auto", max_steps=2, accumulate_grad_batches=2,
                           enable_progress_bar=False, log_every_n_steps=1, check_val_every_n_epoch=None,
                           val_check_interval=4, limit_val_batches=2)
        if cfg.callbacks.get("checkpoint"):
            cfg.callbacks.checkpoint.update(every_n_train_steps=2, save_last=False)
        cfg.max_device_memory_gib = None  # a GPU budget; on the CPU it is refused (tests/test_big_models.py)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_two_steps_at_tiny_size(name, tmp_path):
    cfg = compose_recipe(name, tmp_path, "logger=csv")
    if cfg.model.arch == "llama" and not HAVE_TRANSFORMERS:
        pytest.skip("Llama recipes need transformers: pip install 'lit-optim[transformers]'")
    precision = cfg.trainer.precision
    shrink(cfg)
    metrics = train(cfg)
    assert math.isfinite(metrics["train/loss"])
    assert math.isfinite(metrics["val/loss"]) or not cfg.validate
    if not cfg.callbacks.get("checkpoint"):
        return
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    state = torch.load(ckpt, weights_only=True)  # the recipe's optimizer state loads with weights_only
    assert state["global_step"] == 2
    assert state["hyper_parameters"]["optim"]["name"] == cfg.optim.name
    assert state["hyper_parameters"]["optim"]["lr"] == cfg.optim.lr
    groups = state["optimizer_states"][0]["param_groups"]
    assert all(type(g["betas"]) is tuple for g in groups if "betas" in g)
    if precision == "bf16-true":  # trained in the recipe's precision, not silently in fp32
        assert all(t.dtype == torch.bfloat16 for t in state["state_dict"].values() if t.is_floating_point())
