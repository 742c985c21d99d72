"""Silence import-time chatter from backends that says nothing about optimizers (command-line entry points only)."""

from __future__ import annotations

import logging


def quiet_import_noise() -> None:
    # torchao warns about optional CUDA kernels it cannot load on CPU-only machines, and torch about an enum
    # registration torchao makes; neither concerns optimizer state.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
