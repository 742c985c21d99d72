"""The callback `OptimizerMixin` adds to every run: what a memory-efficient optimizer needs from the Trainer.

- swap in `LitOptimCheckpointIO` so torchao state can resume;
- schedule-free optimizers follow the module: `optimizer.train()` while training, `.eval()` for validation, at the end
  and around checkpoints' evaluation weights;
- bitsandbytes paged optimizers get their state put back into paged memory after a resume (its `load_state_dict`
  copies state into ordinary device tensors);
- optimizers that step in backward log the gradient norm they measured (`grad_norm`).
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback
from lightning.pytorch.trainer.states import TrainerFn

from lit_optim.checkpoint import install_checkpoint_io


def _built(trainer):
    for opt in trainer.optimizers:
        info = getattr(opt, "lit_optim", None)
        if info is not None:
            yield opt, info


def _set_mode(trainer, train: bool) -> None:
    for opt, info in _built(trainer):
        if info.spec.train_eval_switch:
            opt.train() if train else opt.eval()


# bitsandbytes' Optimizer8bit.get_state_buffer pages state only for parameters of at least this many elements.
BNB_PAGED_MIN_NUMEL = 100_000


def repage(optimizer) -> int:
    """Move bitsandbytes state tensors that lost paging (after `load_state_dict`) back into paged buffers."""
    moved = 0
    if not getattr(optimizer, "is_paged", False):
        return moved
    for p, state in optimizer.state.items():
        # bitsandbytes pages all of a parameter's state or none of it, by the *parameter's* size; judging each state
        # tensor by its own size would page AdEMAMix's double-width state1 without its state2, and its prefetch then
        # fails on the unpaged state2.
        if p.numel() < BNB_PAGED_MIN_NUMEL:
            continue
        for key in ("state1", "state2"):
            t = state.get(key)
            if isinstance(t, torch.Tensor) and t.is_cuda and not getattr(t, "is_paged", False):
                fresh = optimizer.get_state_buffer(t, dtype=t.dtype)
                if getattr(fresh, "is_paged", False):
                    fresh.copy_(t)
                    state[key] = fresh
                    moved += 1
    return moved


class OptimizerLifecycle(Callback):
    def setup(self, trainer, pl_module, stage: str) -> None:
        install_checkpoint_io(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        # Runs after a resume has restored optimizer state.
        for opt, _ in _built(trainer):
            repage(opt)
        _set_mode(trainer, True)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        _set_mode(trainer, True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # In-backward optimizers release each gradient as it is used, so nothing can compute the gradient norm after
        # backward; they keep it themselves (before clipping), and it is logged here as `grad_norm`.
        for opt, _ in _built(trainer):
            pop = getattr(opt, "pop_grad_norm", None)
            norm = pop() if callable(pop) else None
            if norm is not None:
                pl_module.log("grad_norm", norm.detach().float().to(pl_module.device), on_step=True, on_epoch=False)

    def on_validation_start(self, trainer, pl_module) -> None:
        _set_mode(trainer, False)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            _set_mode(trainer, True)

    def on_train_end(self, trainer, pl_module) -> None:
        _set_mode(trainer, False)
