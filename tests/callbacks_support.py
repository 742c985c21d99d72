"""Shared by the tests of the monitoring callbacks: real Lightning runs of the tiny LM with a CSV logger, and reading
the CSV back."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lit_optim.task.data import SyntheticTextDataModule
from lit_optim.task.module import LanguageModelTask

# Large enough that its weight matrices get low-bit state (>= 4096 elements, multiples of 256), small enough for CPU.
MODEL = {"arch": "tiny", "vocab_size": 256, "d_model": 64, "n_layers": 2, "n_heads": 2, "max_seq_len": 32}
BATCH, SEQ = 8, 32


@pytest.fixture
def eager_torchao(monkeypatch):
    """torchao compiles its optimizer step per shape (tens of seconds per optimizer on 2 CPU cores, cold cache). The
    state it keeps is the same compiled or not, so tests that only look at state run the step eagerly."""
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kw: fn if fn is not None else (lambda f: f))
    logging.getLogger("torchao").setLevel(logging.ERROR)


def fit(tmp_path: Path, optim: dict[str, Any], steps: int, callbacks: list, *, log_every_n_steps: int = 4,
        logger=None, seed: int = 0, batch_size: int = BATCH, model: dict[str, Any] = MODEL, accelerator: str = "cpu",
        **trainer_kw) -> tuple[L.Trainer, LanguageModelTask]:
    """Fit the tiny LM for `steps` optimizer steps (on the CPU unless told) with a CSV logger (unless `logger`)."""
    L.seed_everything(seed, verbose=False)
    module = LanguageModelTask(model=model, optim=optim)
    data = SyntheticTextDataModule(vocab_size=model["vocab_size"], seq_len=SEQ, batch_size=batch_size,
                                   train_tokens=max(16384, 2 * steps * batch_size * (SEQ + 1)), val_tokens=1024)
    trainer = L.Trainer(
        max_steps=steps, accelerator=accelerator, devices=1,
        logger=logger if logger is not None else CSVLogger(str(tmp_path), name="csv"),
        log_every_n_steps=log_every_n_steps, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks, **trainer_kw,
    )
    trainer.fit(module, data)
    return trainer, module


def read_csv(trainer: L.Trainer) -> list[dict[str, float]]:
    """The CSV logger's rows, empty cells dropped and numbers parsed."""
    path = Path(trainer.logger.log_dir) / "metrics.csv"
    rows = []
    with open(path) as f:
        for row in csv.DictReader(f):
            rows.append({k: float(v) for k, v in row.items() if v not in ("", None)})
    return rows


def values(rows: list[dict[str, float]], key: str) -> list[tuple[int, float]]:
    """(step, value) of every row that logged `key`."""
    return [(int(r["step"]), r[key]) for r in rows if key in r]


def storage_bytes(optimizer) -> int:
    """Sum of the distinct storages reachable from optimizer.state, written without lit_optim's helpers."""
    seen, total = set(), 0

    def leaves(t):
        attrs = getattr(t, "tensor_attrs", None)  # torchao OptimState*: codes, scale, qmap
        if attrs:
            for name in attrs:
                yield getattr(t, name)
        else:
            yield t

    for per_param in optimizer.state.values():
        for value in per_param.values():
            if isinstance(value, torch.Tensor):
                for leaf in leaves(value):
                    ptr = leaf.untyped_storage().data_ptr()
                    if ptr not in seen:
                        seen.add(ptr)
                        total += leaf.untyped_storage().nbytes()
    return total
