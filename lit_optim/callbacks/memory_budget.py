"""`DeviceMemoryBudget`: run as if the GPU had only `max_gib` of memory, to plan for smaller cards on a big one.

An emulation, not a smaller GPU: the cap is PyTorch's caching-allocator limit for this process
(``torch.cuda.set_per_process_memory_fraction``), set in ``setup`` -- before the model is built in
``configure_model`` -- so every allocation of the run counts against it. What the allocator does not hand out is
outside the cap: CUDA managed memory (bitsandbytes' paged optimizer state; `DeviceMemoryMonitor` reports it as
``memory/managed_bytes``), the CUDA context and library workspaces (a few hundred MiB on a real card of that size).
A run that does not fit stops with ``torch.OutOfMemoryError``; `out_of_memory_message` turns that into one line
naming the budget (``lit-optim train`` prints it and exits with status 3).

No metrics are logged; the budget goes into the loggers' hyperparameters as ``max_device_memory_gib``.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_optim.errors import HyperparameterError, IncompatibleConfigError

GIB = 2**30


class DeviceMemoryBudget(Callback):
    def __init__(self, max_gib: float) -> None:
        if isinstance(max_gib, bool) or not isinstance(max_gib, (int, float)) or not max_gib > 0:
            raise HyperparameterError(f"max_device_memory_gib must be a positive number of GiB; got {max_gib!r}.")
        self.max_gib = float(max_gib)
        self.device: torch.device | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        device = trainer.strategy.root_device
        if device.type != "cuda":
            raise IncompatibleConfigError(
                f"max_device_memory_gib={self.max_gib:g} caps CUDA memory, but this run is on {device.type!r}; "
                "remove it, or train on a GPU (trainer=gpu)."
            )
        total = torch.cuda.get_device_properties(device).total_memory
        if self.max_gib * GIB >= total:
            # The card itself is the tighter limit (an "80 GiB" card has about 79 GiB): nothing to emulate.
            rank_zero_warn(
                f"max_device_memory_gib={self.max_gib:g} is not less than this GPU's {total / GIB:.1f} GiB: running "
                "with the whole GPU, which is the stricter limit."
            )
            return
        torch.cuda.set_per_process_memory_fraction(self.max_gib * GIB / total, device)
        self.device = device
        if trainer.logger:
            trainer.logger.log_hyperparams({"max_device_memory_gib": self.max_gib})
        rank_zero_info(
            f"lit_optim: device memory capped at {self.max_gib:g} GiB of {total / GIB:.1f} (emulation: managed/paged "
            "memory is outside the cap and reported as memory/managed_bytes)."
        )

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.device is not None:  # the cap is process-wide: a later run in this process gets the whole card
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)
            self.device = None


def out_of_memory_message(max_gib: float | None, optim_name: str | None = None) -> str:
    """One line for a run that ran out of device memory: the budget, the peak reached, what might fit instead."""
    peak = torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else float("nan")
    name = f"{optim_name!r} " if optim_name else ""
    where = (f"the {max_gib:g} GiB device-memory budget (max_device_memory_gib={max_gib:g})" if max_gib
             else "the GPU's memory")
    return (
        f"out of memory: this run with optimizer {name}does not fit {where}; {peak:.2f} GiB were allocated at the "
        "peak before the failing allocation. To fit: a paged optimizer (paged_adamw_8bit: state in managed memory, "
        "outside the cap), low-bit state (adamw_8bit, adamw_torch_4bit), optim.offload=cpu, in-backward steps "
        "(+optim.in_backward=true), activation checkpointing (model.gradient_checkpointing=true), or a larger budget."
    )
