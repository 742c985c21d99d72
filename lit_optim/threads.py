"""How many threads torch computes with when `lit-optim train` trains on the CPU.

torch starts one intra-op thread per core. On the built-in model (0.5M parameters, 64 x 128 activations per
sequence) each operation is too small to split, and the threads spin waiting for each other: on a two-core machine
shared with other work, the README's default run took 2 min 50 s with torch's two threads and 20-24 s with one. Small
models trained on the CPU therefore get one thread; a user's ``OMP_NUM_THREADS`` or ``torch_threads=N`` wins.
"""

from __future__ import annotations

import os

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info

# Below this many trainable parameters a CPU run gets one thread. Matrices of a model this size have at most a few
# thousand columns, where splitting an operation across threads costs more than it saves once cores are shared.
SMALL_MODEL_PARAMS = 20_000_000


def threads_for(requested: int | None, trainable_params: int, on_cpu: bool) -> int | None:
    """The thread count to set, or None to keep what torch chose (its default, or ``OMP_NUM_THREADS``)."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            from lit_optim.errors import IncompatibleConfigError

            raise IncompatibleConfigError(f"torch_threads must be a positive integer or null; got {requested!r}.")
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return 1 if on_cpu and trainable_params < SMALL_MODEL_PARAMS else None


class CpuThreads(Callback):
    """Sets torch's thread count when fit starts (the model is built by then, so its size is known)."""

    def __init__(self, threads: int | None = None) -> None:
        super().__init__()
        self.threads = threads
        threads_for(threads, 0, False)  # a bad value is refused before the Trainer starts

    def on_fit_start(self, trainer, pl_module) -> None:
        params = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        n = threads_for(self.threads, params, trainer.strategy.root_device.type == "cpu")
        if n is None or n == torch.get_num_threads():
            return
        if self.threads is None:
            rank_zero_info(f"lit_optim: {n} CPU thread for this small model (torch's {torch.get_num_threads()} would "
                           "wait on each other); torch_threads=N or OMP_NUM_THREADS=N sets another count.")
        torch.set_num_threads(n)
