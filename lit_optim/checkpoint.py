"""Checkpoint writing and loading that works for every optimizer in the registry, and never leaves a broken file.

Loading: optimizers built by lit_optim write plain tensors (lit_optim/plain_state.py), which load through any path.
Checkpoints written before that hold torchao's state subclasses: Lightning's `TorchCheckpointIO` loads with a
*callable* `map_location`, which they refuse ("Callable map_location not supported with _rebuild_wrapper_subclass"),
and a process that has not imported torchao.optim refuses their classes under `weights_only=True`. Loading to CPU
first is equivalent for training -- the model and optimizer `load_state_dict` move every tensor to its parameter's
device -- and torchao.optim is imported when such a file names it.

Saving: Lightning writes through an fsspec transaction, whose temporary file lives in the *system* temp directory
($TMPDIR); when that is another filesystem than the checkpoints (a tmpfs /tmp, a node-local scratch disk), the final
"move" is a copy into the checkpoint directory, and a job killed during the copy leaves a half-written .ckpt (and
last.ckpt) that the next resume trips over. `atomic_save` writes a hidden temporary file next to the checkpoint,
fsyncs it and renames it over the target (`os.replace`, atomic within one filesystem), then fsyncs the directory: at
any moment each .ckpt is either the old complete file, the new complete file, or absent. A kill mid-write leaves at
most a hidden ``.<name>.*.partial`` file (never matched by ``*.ckpt`` or Lightning's ``last`` lookup).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import pickle
import tempfile
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

PARTIAL_SUFFIX = ".partial"


def _file_mode() -> int:
    # mkstemp creates 0600 files; a checkpoint gets the mode any other file would (0644 under the usual umask).
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj, path)` that a kill at any moment cannot leave half-written (see the module docstring)."""
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=PARTIAL_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _file_mode())
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # The rename itself is durable only once the directory entry is on disk.
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class LitOptimCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` that saves atomically in place and loads to CPU, so torchao optimizer state can resume."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            # Object stores (s3://, gs://) commit an upload as a whole already; storage options are Lightning's error.
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if callable(map_location) or map_location is None:
            map_location = "cpu"
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except pickle.UnpicklingError as e:
            # Written before lit_optim saved torchao state as plain tensors (lit_optim/plain_state.py): importing
            # torchao.optim registers its state classes as safe to load. Only then, and only for such a file.
            if "torchao.optim." not in str(e) or importlib.util.find_spec("torchao") is None:
                raise
            importlib.import_module("torchao.optim")
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def install_checkpoint_io(trainer) -> bool:
    """Swap the strategy's plain `TorchCheckpointIO` for ours; leave custom (e.g. async, FSDP) IO alone."""
    strategy = trainer.strategy
    current = getattr(strategy, "checkpoint_io", None)
    if type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = LitOptimCheckpointIO()
        return True
    return isinstance(current, LitOptimCheckpointIO)
