"""The shipped Hydra configs: the `optim` group mirrors the registry, and every option of every group composes with
Hydra's compose API (`lit_optim.conf` as installed) and builds what it describes.

CPU-capable optimizers are built from their YAML; CUDA-only ones must refuse clearly on a machine without a GPU.
Models too large for CPU memory are built on the meta device (their parameter count is still checked).
"""

from __future__ import annotations

import io
from importlib import resources
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lit_optim import hydra_configs
from lit_optim.build import build_optimizer
from lit_optim.errors import DeviceRequirementError
from lit_optim.registry import all_specs, availability, get_spec
from lit_optim.scheduler import build_scheduler
from lit_optim.spec import CPU
from lit_optim.task.models import build_model
from lit_optim.train import build_logger

try:  # the package Hydra reads, wherever and however it is installed
    CONF = resources.files("lit_optim.conf")
    INSTALLED = True
except ModuleNotFoundError:  # a source tree run uninstalled (the GPU machines): the same files, from conf/
    CONF = Path(__file__).resolve().parent.parent / "conf"
    INSTALLED = False
TINY = {"arch": "tiny", "vocab_size": 256, "d_model": 64, "n_layers": 2, "n_heads": 2, "max_seq_len": 32}


def options(group: str) -> list[str]:
    return sorted(Path(p.name).stem for p in (CONF / group).iterdir() if p.name.endswith(".yaml"))


@pytest.fixture(scope="module", autouse=True)
def hydra_initialized():
    """One Hydra initialization for the module (it costs more than a compose)."""
    if INSTALLED:
        with initialize_config_module("lit_optim.conf", version_base="1.3"):
            yield
    else:
        with initialize_config_dir(str(CONF), version_base="1.3"):
            yield


def compose_train(tmp_path: Path, *overrides: str):
    return compose("train", overrides=[f"output_dir={tmp_path}", *overrides])


def plain(node):
    return OmegaConf.to_container(node, resolve=True)


# --- optim group <-> registry ---------------------------------------------------------------------------------------


def test_optim_group_matches_registry_one_to_one():
    assert hydra_configs.main(["--check"]) == 0, "conf/optim is stale: run `python -m lit_optim.hydra_configs`"
    names = {n for spec in all_specs() for n in spec.names}
    have = set(options("optim"))
    assert have == {Path(f).stem for f in hydra_configs.expected_files()}
    assert have == names, f"YAML without a name: {sorted(have - names)}; name without YAML: {sorted(names - have)}"


@pytest.mark.parametrize("name", options("optim"))
def test_every_optim_yaml_composes_and_builds(name, tmp_path):
    cfg = compose_train(tmp_path, f"optim={name}")
    hp = plain(cfg.optim)
    assert hp.pop("name") == name
    spec = get_spec(name)
    if not availability(spec).ok:
        if spec.requires_cuda or CPU not in spec.supports:
            with pytest.raises(DeviceRequirementError, match="CUDA"):
                build_optimizer(build_model(TINY), name, **hp)
            return
        pytest.skip(availability(spec).reason)
    torch.manual_seed(0)
    model = build_model(TINY)
    optimizer = build_optimizer(model, name, **hp)
    assert isinstance(optimizer, spec.load_class())
    # Every YAML value reached the optimizer; lists arrive as tuples (weights_only checkpoints need plain types).
    composite = len({g.get("kind") for g in optimizer.param_groups}) > 1  # e.g. muon: Muon + AdamW groups
    for key, value in hp.items():
        groups = [g for g in optimizer.param_groups if key in g]
        if not groups or key == "weight_decay":  # weight decay is per group: 0 for norms and biases
            continue
        want = tuple(value) if isinstance(value, list) else value
        same = [g[key] == want or (torch.is_tensor(g[key]) and float(g[key]) == want) for g in groups]
        # A composite optimizer's parts keep their own values for keys the YAML sets for the other part.
        assert any(same) if composite else all(same), (key, want, groups)
        if isinstance(value, list):
            assert all(type(g[key]) is tuple for g in groups), key
    # The param groups (where ListConfig betas would hide) survive a weights_only round trip. Stepping every
    # optimizer is tests/test_build_each_name.py's job; test_yaml_betas_are_a_tuple_in_a_real_checkpoint steps one.
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert [len(g["params"]) for g in loaded["param_groups"]] == [len(g["params"]) for g in optimizer.param_groups]


def test_command_line_style_overrides_reach_the_built_optimizer(tmp_path):
    cfg = compose_train(tmp_path, "optim=paged_adamw_8bit", "optim.lr=2e-5", "optim.betas=[0.8,0.95]",
                        "optim.weight_decay=0.05")
    optimizer = build_optimizer(build_model(TINY), **plain(cfg.optim))
    assert type(optimizer).__name__ == "PagedAdamW8bit" and optimizer.is_paged
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert all(g["lr"] == pytest.approx(2e-5) for g in groups.values())
    assert all(g["betas"] == (0.8, 0.95) and type(g["betas"]) is tuple for g in groups.values())
    assert groups["decay"]["weight_decay"] == pytest.approx(0.05) and groups["no_decay"]["weight_decay"] == 0.0


def test_yaml_betas_are_a_tuple_in_a_real_checkpoint(tmp_path):
    """Through `lit_optim.train.train`: a Lightning checkpoint of a bitsandbytes optimizer loads with weights_only."""
    from lit_optim.train import train

    cfg = compose_train(
        tmp_path, "optim=adamw_8bit", "optim.lr=3e-4", "logger=csv", "model.d_model=64", "model.n_heads=2",
        "model.max_seq_len=32", "data.seq_len=32", "data.batch_size=4", "data.train_tokens=2048",
        "data.val_tokens=256", "trainer.max_steps=2", "trainer.enable_progress_bar=false",
        "trainer.accelerator=cpu", "callbacks.checkpoint.every_n_train_steps=2", "callbacks.checkpoint.save_last=false",
        "validate=false",
    )
    train(cfg)
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    state = torch.load(ckpt, weights_only=True)
    groups = state["optimizer_states"][0]["param_groups"]
    assert [type(g["betas"]) for g in groups] == [tuple] * len(groups)
    assert all(0 < g["lr"] <= 3e-4 for g in groups)
    assert state["hyper_parameters"]["optim"]["name"] == "adamw_8bit"
    assert list(state["hyper_parameters"]["optim"]["betas"]) == [0.9, 0.999]


# --- every option of every other group --------------------------------------------------------------------------------


@pytest.mark.parametrize("option", options("scheduler"), ids=lambda o: f"scheduler={o}")
def test_scheduler_options(option, tmp_path):
    cfg = compose_train(tmp_path, f"scheduler={option}")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, plain(cfg.scheduler), total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    warmup = round(cfg.scheduler.warmup_ratio * 100)
    assert max(lrs) == pytest.approx(1.0, abs=0.02)
    if warmup:
        assert lrs[0] < lrs[warmup - 1]
    if option == "constant":
        assert lrs[-1] == pytest.approx(1.0)
    else:
        assert lrs[-1] < 0.2 and lrs[-1] >= cfg.scheduler.min_lr_ratio - 1e-6


@pytest.mark.parametrize("option", options("model"), ids=lambda o: f"model={o}")
def test_model_options(option, tmp_path):
    cfg = plain(compose_train(tmp_path, f"model={option}").model)
    if cfg["arch"] == "llama":
        pytest.importorskip("transformers", reason="llama models need the transformers extra")
    expected = {"tiny": (0.4e6, 0.6e6), "llama_1b": (1.2e9, 1.3e9), "llama31_8b": (8.0e9, 8.1e9),
                "llama_30b": (32.4e9, 32.6e9)}[option]
    with torch.device("meta"):  # no memory for the weights: the 8B model is checked on CPU too
        model = build_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert expected[0] < n < expected[1], n
    if cfg["arch"] == "llama":
        assert model.config.hidden_size == cfg["hidden_size"]
        assert model.is_gradient_checkpointing == cfg["gradient_checkpointing"]


@pytest.mark.parametrize("option", options("data"), ids=lambda o: f"data={o}")
def test_data_options(option, tmp_path):
    cfg = compose_train(tmp_path, f"data={option}")
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.shape == (cfg.data.batch_size, cfg.data.seq_len + 1)
    assert int(batch.max()) < cfg.model.vocab_size
    assert len(datamodule.val_dataloader()) > 0


@pytest.mark.parametrize("option", options("trainer"), ids=lambda o: f"trainer={o}")
def test_trainer_options(option, tmp_path):
    cfg = compose_train(tmp_path, f"trainer={option}")
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        # Composes with what it promises; on CPU only what Lightning allows there is instantiated.
        assert cfg.trainer.precision == "bf16-mixed"
        cpu = OmegaConf.merge(cfg.trainer, {"accelerator": "cpu", "devices": 1})
        if cfg.trainer.strategy == "fsdp":
            with pytest.raises(Exception, match="GPU"):
                instantiate(cpu, logger=False)
            return
        trainer = instantiate(cpu, logger=False)
    else:
        trainer = instantiate(cfg.trainer, logger=False)
    assert isinstance(trainer, L.Trainer)
    assert trainer.max_steps == cfg.trainer.max_steps
    chosen = cfg.trainer.strategy
    if OmegaConf.is_dict(chosen):  # a strategy object (trainer=fsdp2): that class, whatever the device count
        strategy = chosen._target_.rsplit(".", 1)[-1]
    else:
        strategy = {"ddp": "DDPStrategy"}.get(str(chosen), "SingleDeviceStrategy")
    assert type(trainer.strategy).__name__ == strategy


@pytest.mark.parametrize("option", options("callbacks"), ids=lambda o: f"callbacks={o}")
def test_callbacks_options(option, tmp_path):
    cfg = compose_train(tmp_path, f"callbacks={option}")
    callbacks = {name: instantiate(node) for name, node in cfg.callbacks.items() if node}
    assert all(isinstance(c, L.Callback) for c in callbacks.values())
    if option == "default":
        assert Path(callbacks["checkpoint"].dirpath) == tmp_path / "checkpoints"


@pytest.mark.parametrize("option", options("logger"), ids=lambda o: f"logger={o}")
def test_logger_options(option, tmp_path):
    cfg = compose_train(tmp_path, f"logger={option}")
    if option == "none":
        assert build_logger(cfg.logger) is False
        return
    if option == "wandb":
        # Instantiated, not started: starting a run is covered by tests/test_cli.py in its own process.
        logger = instantiate(cfg.logger)
        assert type(logger).__name__ == "WandbLogger" and logger._offline
        return
    logger = build_logger(cfg.logger)
    logger.log_metrics({"x": 1.0}, step=0)
    logger.finalize("success")
    assert any(tmp_path.rglob("metrics.csv" if option == "csv" else "events.out.tfevents*"))
