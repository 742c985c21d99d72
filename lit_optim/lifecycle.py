"""The callback `OptimizerMixin` adds to every run: what a memory-efficient optimizer needs from the Trainer.

- swap in `LitOptimCheckpointIO` (atomic saves; checkpoints written before optimizer state was saved as plain
  tensors still load);
- schedule-free optimizers follow the module: `optimizer.train()` while training, `.eval()` for validation, at the end
  and around checkpoints' evaluation weights;
- bitsandbytes paged optimizers get their state put back into paged memory after a resume (its `load_state_dict`
  copies state into ordinary device tensors);
- optimizers that step in backward log the gradient norm they measured (`grad_norm`);
- every checkpoint records the optimizer it was written with (``checkpoint["lit_optim"]["optimizer"]``), so a resume
  with another optimizer is refused before step 1 instead of failing in it; checkpoint directories are checked
  writable when fit starts, not at the first save;
- under automatic optimization, gradients are freed (set to None) at the end of every batch in which the optimizer
  stepped, unless the module says `release_grads_after_step = False`. Lightning zeroes them only in the next step's
  closure, after its forward, so
  the previous step's gradients would sit next to the new activations (on a 1B Llama, +3.7 GiB at GaLore's peak).
  "Stepped" means the optimizer's own `step` ran (a step post-hook says so): at the end of an accumulation window,
  also under strategies that accumulate by themselves. A step a GradScaler skipped leaves the gradients to
  Lightning's zeroing, and a module that overrides `optimizer_zero_grad` keeps its own;
- when fit starts, the optimizer must be the one the mixin built from ``optim=``: a module's own
  `configure_optimizers` that returns another is refused, naming the fix.

`with_lifecycle` wraps the mixin's `configure_callbacks`, and every override of it in a mixin module (the mixin's
``__init_subclass__`` does that), so the callback is there whether or not the override calls ``super()``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden

from lit_optim.bnb_adapter import repage
from lit_optim.checkpoint import install_checkpoint_io
from lit_optim.errors import MixinUsageError
from lit_optim.preflight import check_writable
from lit_optim.resume import RECORD_KEY, canonical_name
from lit_optim.schedule_free import switch_mode


def _built(trainer):
    for opt in trainer.optimizers:
        info = getattr(opt, "lit_optim", None)
        if info is not None:
            yield opt, info


def _releases_grads(pl_module) -> bool:
    # Under manual optimization the module zeroes its gradients itself, perhaps accumulating some across batches.
    return (bool(getattr(pl_module, "release_grads_after_step", True)) and pl_module.automatic_optimization
            and not is_overridden("optimizer_zero_grad", pl_module, LightningModule))


def _set_mode(trainer, train: bool) -> None:
    for opt, info in _built(trainer):
        if info.spec.train_eval_switch:
            switch_mode(opt, train)


def with_lifecycle(configure_callbacks: Callable) -> Callable:
    """`configure_callbacks` that always includes one `OptimizerLifecycle`, whatever the wrapped method returns."""
    if getattr(configure_callbacks, "_lit_optim_lifecycle", False):
        return configure_callbacks

    @functools.wraps(configure_callbacks)
    def wrapper(self):
        callbacks = configure_callbacks(self)
        callbacks = list(callbacks) if isinstance(callbacks, Sequence) else ([callbacks] if callbacks else [])
        if not any(isinstance(c, OptimizerLifecycle) for c in callbacks):  # super() already added it
            callbacks.append(OptimizerLifecycle())
        return callbacks

    wrapper._lit_optim_lifecycle = True
    return wrapper


def _describe(optimizer) -> str:
    info = getattr(optimizer, "lit_optim", None)
    return repr(info.spec.name) if info is not None else type(optimizer).__name__


def check_optimizer_is_the_mixins(trainer, pl_module) -> None:
    """Refuse a module whose own `configure_optimizers` built something else than ``optim=`` asks for."""
    want = (getattr(pl_module, "optim_config", None) or {}).get("name")
    if not want:
        return  # the callback without the mixin: nothing was asked for
    built = [info.spec.name for _, info in _built(trainer)]
    if canonical_name(want) in built:
        return
    got = ", ".join(_describe(opt) for opt in trainer.optimizers) or "no optimizer"
    raise MixinUsageError(
        f"{type(pl_module).__name__}.configure_optimizers returned {got}, not the {want!r} that optim= asks for "
        "(and hparams record): delete it, or return super().configure_optimizers() from it (with scheduler=None "
        "that is the optimizer itself, to pair with a scheduler of your own)."
    )


class OptimizerLifecycle(Callback):
    def __init__(self) -> None:
        self._stepped: list[torch.optim.Optimizer] = []
        self._hooks: list = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        install_checkpoint_io(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        # Runs after a resume has restored optimizer state.
        for opt, _ in _built(trainer):
            repage(opt)
        _set_mode(trainer, True)
        self._remove_hooks()
        if _releases_grads(pl_module):
            for opt in trainer.optimizers:
                register = getattr(opt, "register_step_post_hook", None)
                if callable(register):
                    self._hooks.append(register(self._mark_stepped))

    def on_fit_start(self, trainer, pl_module) -> None:
        # Optimizers exist from here on (the strategy's setup ran configure_optimizers); step 1 has not run.
        check_optimizer_is_the_mixins(trainer, pl_module)
        if trainer.is_global_zero:  # the rank that writes checkpoints
            for callback in trainer.checkpoint_callbacks:
                check_writable(getattr(callback, "dirpath", None), "ModelCheckpoint dirpath")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        name = (getattr(pl_module, "optim_config", None) or {}).get("name")
        if name:
            checkpoint[RECORD_KEY] = {"optimizer": canonical_name(name)}

    def _mark_stepped(self, optimizer, args, kwargs) -> None:
        self._stepped.append(optimizer)

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._stepped.clear()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._remove_hooks()  # also after a fit that failed before on_train_end

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
        for opt in self._stepped:
            opt.zero_grad(set_to_none=True)
        self._stepped.clear()

    def on_validation_start(self, trainer, pl_module) -> None:
        _set_mode(trainer, False)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            _set_mode(trainer, True)

    def on_train_end(self, trainer, pl_module) -> None:
        _set_mode(trainer, False)
        self._remove_hooks()
