"""`lit-optim train` run in this process (Hydra's real entry point, `lit_optim.train.main`): under a second a run,
instead of the seconds a fresh interpreter spends importing torch and Lightning."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import pytest

from lit_optim import train as train_mod

# A small, quick run: the built-in tiny LM on CPU, a checkpoint every step, nothing but checkpointing.
QUICK = ["callbacks=basic", "callbacks.lr_monitor=null", "validate=false", "trainer.accelerator=cpu",
         "trainer.enable_progress_bar=false", "callbacks.checkpoint.every_n_train_steps=1",
         "data.batch_size=8"]
SMALL_SYNTHETIC = ["data.train_tokens=16384", "data.val_tokens=512"]  # generating the default corpus takes a while


def run_train(run_dir: Path, *overrides: str, logger: str = "none") -> tuple[int, str]:
    """(exit code, stderr) of `lit-optim train hydra.run.dir=<run_dir> logger=<logger> <QUICK> <overrides>`."""
    synthetic = not any(o.startswith("data=") for o in overrides)
    argv = ["lit-optim", f"hydra.run.dir={run_dir}", f"logger={logger}", *QUICK,
            *(SMALL_SYNTHETIC if synthetic else []), *overrides]
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        mp.setattr(sys, "argv", argv)
        try:
            train_mod.main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code, err.getvalue()
