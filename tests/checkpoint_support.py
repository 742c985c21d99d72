"""A user's module and data, checkpoints of it for each kind of optimizer state, and the references to compare.

Imported by tests/test_checkpoint_paths.py (which writes the checkpoints once per test session) and by
tests/checkpoint_paths_worker.py (the fresh processes that load them through each path).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_optim import OptimizerMixin

STEPS = 3  # steps before the checkpoint; the fit path takes one more after it

# Each kind of optimizer state a checkpoint can hold. Low-rank names get a rank below the 32x64 weight's smaller
# side; one weight shape, so torchao compiles its step once.
KINDS: dict[str, dict[str, Any]] = {
    "torch": {"name": "adamw_torch", "lr": 1e-2},
    "torchao_8bit": {"name": "adamw_torch_8bit", "lr": 1e-2},
    "torchao_4bit": {"name": "adamw_torch_4bit", "lr": 1e-2},
    "bnb_8bit": {"name": "adamw_8bit", "lr": 1e-2},
    "galore": {"name": "galore_adamw", "lr": 1e-2, "rank": 4},
    "in_backward": {"name": "galore_adamw_layerwise", "lr": 1e-2, "rank": 4},
    "schedule_free": {"name": "schedule_free_adamw", "lr": 1e-2},
}
TORCHAO_KINDS = ("torchao_8bit", "torchao_4bit")


def available_kinds() -> list[str]:
    import importlib.util

    return [k for k in KINDS if k != "schedule_free" or importlib.util.find_spec("schedulefree") is not None]


class Net(OptimizerMixin, L.LightningModule):
    """A user's module as the README writes it: the mixin, two arguments, no `configure_optimizers`."""

    def __init__(self, optim: str | dict | None = "adamw_torch", scheduler: dict | None = None):
        super().__init__(optim=optim, scheduler=scheduler)
        self.save_hyperparameters()
        # The 64 x 64 weight (4096 elements) gets quantized torchao state; smaller tensors keep 32-bit state.
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.mse_loss(self(x), y))


def data(n: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 32, generator=g)
    return DataLoader(TensorDataset(x, torch.tanh(x @ torch.randn(32, 64, generator=g))), batch_size=8)


class Data(L.LightningDataModule):
    """The same data as a datamodule, for LightningCLI."""

    def train_dataloader(self):
        return data()

    def val_dataloader(self):
        return data(16)

    def test_dataloader(self):
        return data(16)


def flat_state(optimizer) -> list[tuple[str, Any]]:
    """The optimizer state in parameter order, torchao subclasses unwrapped to their inner tensors (as plain
    tensors, so the list itself saves and loads with `weights_only=True`), with each value's class name."""
    from harness import _flatten_state

    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in sorted(optimizer.state.get(p, {}).items()):
                out.append((f"{key}:type", type(value).__name__))
    # Copies: on the CPU the flattened tensors share storage with the live state, which the next step updates.
    return out + [(k, v.as_subclass(torch.Tensor).clone() if isinstance(v, torch.Tensor) else v)
                  for k, v in _flatten_state(optimizer)]


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        ka == kb and (torch.equal(va, vb) and va.dtype == vb.dtype if isinstance(va, torch.Tensor) else va == vb)
        for (ka, va), (kb, vb) in zip(a, b))


def trainer(root: Path, steps: int, **kw) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                     default_root_dir=str(root), **kw)


def write_checkpoints(root: Path, kinds: list[str]) -> dict[str, Any]:
    """Train each kind STEPS steps; write its Lightning checkpoint, a Fabric checkpoint of the same objects, and the
    references (optimizer state, weights) the fresh processes compare against. Returns the index (also index.json)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    root.mkdir(parents=True, exist_ok=True)
    index = {}
    for kind in kinds:
        L.seed_everything(0, verbose=False)
        module = Net(optim=KINDS[kind])
        ckpt = ModelCheckpoint(dirpath=str(root / kind), filename="last", save_top_k=1)
        t = trainer(root / kind, STEPS, callbacks=[ckpt])
        t.fit(module, data())
        opt = t.optimizers[0]
        if opt.lit_optim.spec.train_eval_switch:
            opt.train()  # schedule-free: the Trainer left it in eval mode; a Fabric loop saves it training
        fabric = L.Fabric(accelerator="cpu", devices=1)
        fabric.save(root / kind / "fabric.ckpt", {"model": module, "optimizer": opt, "step": STEPS})
        # The weights the Lightning checkpoint was written with (schedule-free: its training weights, before the
        # end of fit switched to the evaluation ones), and those of the Fabric checkpoint.
        weights = torch.load(root / kind / "last.ckpt", weights_only=True)["state_dict"]
        torch.save({"state": flat_state(opt), "weights": weights,
                    "fabric_weights": {k: v.clone() for k, v in module.state_dict().items()}},
                   root / kind / "reference.pt")
        index[kind] = {"optim": KINDS[kind], "lightning": str(root / kind / "last.ckpt"),
                       "fabric": str(root / kind / "fabric.ckpt"), "reference": str(root / kind / "reference.pt")}
    if "torchao_8bit" in index:
        # A checkpoint as lit_optim wrote it before its state was plain (torchao's subclasses pickled as they are),
        # first in the index: the Trainer's reader must load it in a process that has not imported torchao yet.
        index = {"torchao_8bit_old_format": old_format(index["torchao_8bit"], root), **index}
    (root / "index.json").write_text(json.dumps(index, indent=1))
    return index


def old_format(entry: dict[str, Any], root: Path) -> dict[str, Any]:
    from lit_optim.checkpoint import atomic_save
    from lit_optim.plain_state import from_plain

    checkpoint = torch.load(entry["lightning"], weights_only=True)
    checkpoint["optimizer_states"] = [from_plain(s) for s in checkpoint["optimizer_states"]]
    state = checkpoint["optimizer_states"][0]["state"]
    assert any(type(v).__name__ == "OptimState8bit" for entry in state.values() for v in entry.values())
    path = root / "torchao_8bit_old_format.ckpt"
    atomic_save(checkpoint, path)
    # Not for LightningCLI: it reads the checkpoint's hyperparameters with a plain torch.load before anything else.
    return {**entry, "lightning": str(path), "paths": ["load", "fit"], "old_format": True}
