"""Run inputs checked before step 1: the seed, gradient accumulation, data against the model, writable directories.

Each of these used to surface only inside training: `accumulate_grad_batches=0` as a ZeroDivisionError in step 1, a
data vocabulary larger than the model's as an IndexError in the embedding, a read-only checkpoint directory at the
first save (after the first 100 steps). `lit-optim train` runs them before the Trainer starts; the mixin and the
built-in task run the ones that apply to a Trainer of your own before its first step.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lit_optim.errors import HyperparameterError, UnwritablePathError

MAX_SEED = 2**32 - 1  # numpy's seed range, which Lightning's seed_everything enforces


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise HyperparameterError(f"seed must be an integer from 0 to {MAX_SEED}; got {seed!r}. Set e.g. seed=1234.")
    return seed


def check_accumulation(value: Any, key: str = "trainer.accumulate_grad_batches") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HyperparameterError(
            f"{key} must be an integer >= 1 (the number of batches per optimizer step; 1: no accumulation); "
            f"got {value!r}."
        )


def check_data_fits_model(datamodule: Any, model_config: Mapping[str, Any]) -> None:
    """A data module's token ids and sequence length against what the model can embed.

    The ids come from its `token_vocab()` (the built-in modules: data.vocab_size, or the tokenizer's size), else from
    its hparams' ``vocab_size``; the length from its hparams' ``seq_len``. Data modules with neither are not checked.
    """
    from lit_optim.task.models import model_limits

    hparams = getattr(datamodule, "hparams", None)
    hparams = hparams if isinstance(hparams, Mapping) else {}
    token_vocab = getattr(datamodule, "token_vocab", None)
    if callable(token_vocab):
        vocab, source = token_vocab()
    else:
        vocab, source = hparams.get("vocab_size"), f"data.vocab_size={hparams.get('vocab_size')}"
    seq_len = hparams.get("seq_len")
    limits = model_limits(model_config)
    if isinstance(vocab, int) and isinstance(limits["vocab_size"], int) and vocab > limits["vocab_size"]:
        raise HyperparameterError(
            f"{source} is larger than model.vocab_size={limits['vocab_size']}: token ids up to {vocab - 1} would "
            f"overflow the model's embedding. Use data with at most {limits['vocab_size']} token ids or raise "
            f"model.vocab_size."
        )
    positions = limits["max_positions"]
    if isinstance(seq_len, int) and isinstance(positions, int) and seq_len > positions:
        raise HyperparameterError(
            f"data.seq_len={seq_len} is longer than the model's {positions} positions "
            f"(model.{limits['positions_key']}). Lower data.seq_len or raise model.{limits['positions_key']}."
        )


def check_writable(path: Any, key: str) -> None:
    """`path` (a directory, made later if missing) can be written: its nearest existing ancestor takes a new file."""
    from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

    if path is None or not _is_local_file_protocol(str(path)):
        return  # object stores (s3://...) are checked by their own client when written
    target = Path(os.path.abspath(os.path.expanduser(str(path))))
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UnwritablePathError(f"{key}={path} cannot be created: {existing} is a file, not a directory. Point "
                                  f"{key} at a directory.")
    try:
        # A real write, not os.access: that ignores read-only mounts and says yes to root everywhere.
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".lit_optim_write_probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        where = "" if existing == target else f" (in {existing}, where it would be created)"
        raise UnwritablePathError(
            f"{key}={path} is not writable{where}: {err.strerror}. Point {key} at a directory this user can "
            f"write."
        ) from None
