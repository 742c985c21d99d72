"""`OptimizerMixin`: `configure_optimizers` for any LightningModule, from a name and a scheduler config.

    class MyModule(OptimizerMixin, L.LightningModule):
        def __init__(self, ..., optim="adamw_torch", scheduler=None):
            super().__init__(optim=optim, scheduler=scheduler)

`optim` is a registry name or a mapping ``{"name": ..., **hyperparameters}`` (a Hydra node works too); `scheduler`
is ``None`` (constant LR) or ``{"name": "cosine"|"linear"|"constant", "warmup_steps"|"warmup_ratio", "min_lr_ratio"}``.
The request is validated when the module is constructed, and against the Trainer (strategy, clipping,
accumulation, device) when optimizers are configured -- both before step 1. A checkpoint being resumed is checked when
Lightning hands it to `on_load_checkpoint`, before any of it is restored: it must hold this module's parameter shapes
and state written by the same optimizer.

Gradients are released (set to None) at the end of each batch whose optimizer stepped, as Hugging Face's Trainer
does after its step (see `lifecycle.py`). Lightning only zeroes them inside the next step's closure, after its
forward pass, so without this the previous step's gradients and the next forward's activations are alive together
(on a 1B Llama: +3.7 GiB at the peak with GaLore; see benchmarks/README.md). The Trainer's callbacks still see them
in ``on_train_batch_end``; the module's own ``on_train_batch_end`` runs after the release.
``release_grads_after_step=False`` keeps them until Lightning zeroes them.

The mixin cannot be bypassed silently (each rule is checked before step 1; see README "Adopting the mixin"):

- it must come before LightningModule in the bases (checked when the class is defined);
- a module's own ``configure_optimizers`` must return ``super().configure_optimizers()`` (or, with ``scheduler=None``,
  pair that optimizer with a scheduler of its own); one that builds another optimizer is refused when fit starts;
- a module's own ``configure_callbacks`` keeps lit_optim's lifecycle callback, with or without ``super()``;
- no ``optim=`` trains ``adamw_torch``, said once per class with how to choose.

``module.lr`` is the optimizer's learning rate (``optim["lr"]``, else the optimizer's default), so Lightning's LR
finder reads it and, with ``update_attr=True``, writes its suggestion there (and into ``hparams.optim``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_optim.build import _plain, accepted_arguments, build_optimizer, check_available, resolve_hyperparameters
from lit_optim.errors import HyperparameterError, IncompatibleConfigError, MixinUsageError
from lit_optim.lifecycle import with_lifecycle
from lit_optim.nesting import leaves
from lit_optim.param_groups import fsdp1_shapes
from lit_optim.preflight import check_accumulation
from lit_optim.registry import get_spec
from lit_optim.resume import check_model, check_optimizer
from lit_optim.scheduler import build_scheduler
from lit_optim.spec import CPU, DDP, FSDP1, FSDP2, FSDP2_FIX, GRAD_ACCUM, GRAD_CLIP, OptimizerSpec

DEFAULT_OPTIM = "adamw_torch"


def normalize_optim_config(optim: str | Mapping[str, Any] | None) -> dict[str, Any]:
    if optim is None:
        optim = DEFAULT_OPTIM
    if isinstance(optim, str):
        return {"name": optim}
    cfg = _plain(optim)
    if not isinstance(cfg, dict) or "name" not in cfg:
        raise HyperparameterError(
            f"The optimizer config needs a 'name' (e.g. {{'name': 'adamw_torch', 'lr': 1e-4}}); got {optim!r}."
        )
    cfg.pop("_convert_", None)
    return cfg


def check_strategy(trainer) -> None:
    """Refuse, before anything is built, a strategy lit_optim cannot serve whatever the optimizer."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if isinstance(trainer.strategy, DeepSpeedStrategy):
        raise IncompatibleConfigError(
            "lit_optim does not support Lightning's DeepSpeedStrategy: DeepSpeed replaces the optimizer with its own "
            "ZeRO/bf16 optimizer, which steps flat 1-D partitions of fp32 master copies of the parameters (so "
            "low-bit, low-rank and Muon state would be built for the wrong shapes, and schedule-free's train/eval "
            "switch would miss the model's weights) and hides the optimizer from lit_optim's checks, callbacks and "
            f"resume. Use FSDP2 ({FSDP2_FIX}) to shard, or DDP."
        )


def check_trainer_compatibility(spec: OptimizerSpec, trainer, device_type: str) -> None:
    """Known-incompatible combinations of optimizer and Trainer settings, refused with the reason and a fix."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

    strategy = trainer.strategy
    problems = []
    if device_type != "cuda" and CPU not in spec.supports:
        problems.append(f"it runs only on CUDA but the model is on {device_type!r}; use accelerator='gpu'")
    if isinstance(strategy, FSDPStrategy) and FSDP1 not in spec.supports:
        why = spec.unsupported_why.get(FSDP1, "FSDP1 hands the optimizer 1-D slices of flattened parameters and "
                                              "gathers only state shaped like them")
        fix = f"use FSDP2 ({FSDP2_FIX})" if FSDP2 in spec.supports else "use DDP"
        problems.append(f"it does not support FSDP1, Lightning's strategy='fsdp' ({why}); {fix}, or an elementwise "
                        "torch optimizer such as adamw_torch")
    elif isinstance(strategy, ModelParallelStrategy) and FSDP2 not in spec.supports:
        why = spec.unsupported_why.get(FSDP2, "its state cannot go through FSDP's optimizer state dict")
        problems.append(f"it does not support FSDP2, Lightning's ModelParallelStrategy ({why}); use DDP, or an "
                        "optimizer that does, such as adamw_torch, adamw_torch_8bit or adamw_fused_8bit")
    elif isinstance(strategy, DDPStrategy) and DDP not in spec.supports:
        why = spec.unsupported_why.get(DDP)
        problems.append("it does not support DDP" + (f" ({why})" if why else "") + "; train on one device")
    if (isinstance(strategy, FSDPStrategy) and trainer.gradient_clip_val
            and getattr(trainer, "gradient_clip_algorithm", "norm") in (None, "norm")):
        # Lightning's FSDP1 precision plugin raises this only at the first clip, after a whole forward and backward.
        problems.append("Lightning's FSDPStrategy cannot clip gradients by norm; set gradient_clip_algorithm='value',"
                        f" remove gradient_clip_val, or use FSDP2 ({FSDP2_FIX})")
    if trainer.gradient_clip_val and GRAD_CLIP not in spec.supports:
        problems.append("it cannot use Trainer(gradient_clip_val=...); remove gradient clipping")
    if trainer.accumulate_grad_batches > 1 and GRAD_ACCUM not in spec.supports:
        problems.append("it cannot accumulate gradients; set accumulate_grad_batches=1")
    if problems:
        raise IncompatibleConfigError(f"Optimizer {spec.name!r} cannot run with this Trainer: " + "; ".join(problems))
    if spec.paged and device_type != "cuda":
        rank_zero_warn(f"{spec.name!r}: paged memory needs CUDA; on {device_type} its state is ordinary memory.")


def _fsdp1_shapes(trainer) -> dict:
    """Under Lightning's FSDPStrategy the LightningModule sits inside the FSDP1 wrapper (the strategy's model), which
    alone knows the shapes of the parameters it flattened into 1-D slices."""
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = getattr(trainer, "strategy", None)
    return fsdp1_shapes(strategy.model) if isinstance(strategy, FSDPStrategy) else {}


_announced_default: set[type] = set()  # classes already told that they train the default optimizer


def check_base_order(cls: type) -> None:
    """After LightningModule, the mixin's ``__init__`` never runs: ``optim=`` reaches torch's Module and fails there."""
    mro = cls.__mro__
    if LightningModule in mro and mro.index(LightningModule) < mro.index(OptimizerMixin):
        raise MixinUsageError(
            f"{cls.__name__}: put OptimizerMixin before LightningModule in the bases, as in `class {cls.__name__}"
            "(OptimizerMixin, L.LightningModule)`; after it, optim= never reaches the mixin."
        )


def _keep_tensor_lr(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    # torchao keeps each group's LR as a tensor its compiled step reads, and refuses a float there ("lr was changed
    # to a non-Tensor object"). Lightning's LR finder (and its update_attr) write plain floats: take them as values.
    for group in optimizer.param_groups:
        lr = group["lr"]
        if not isinstance(lr, torch.Tensor):
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32)


def keep_tensor_lrs(optimizer: torch.optim.Optimizer) -> None:
    for opt in {id(o): o for o in (optimizer, *leaves([optimizer]))}.values():
        if any(isinstance(g["lr"], torch.Tensor) for g in opt.param_groups):
            opt.register_step_pre_hook(_keep_tensor_lr)


class OptimizerMixin:
    """Give a LightningModule `configure_optimizers` from lit_optim's registry. Put it before LightningModule."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_base_order(cls)
        # A module's own configure_callbacks that forgets super() would drop the lifecycle callback: schedule-free
        # steps in eval mode, torchao state cannot resume, gradients are kept. It is added back, whatever it returns.
        own = cls.__dict__.get("configure_callbacks")
        if callable(own):
            cls.configure_callbacks = with_lifecycle(own)

    def __init__(
        self,
        *args: Any,
        optim: str | Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        release_grads_after_step: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(release_grads_after_step, bool):
            raise HyperparameterError(
                f"release_grads_after_step must be True or False; got {release_grads_after_step!r}.")
        self.release_grads_after_step = release_grads_after_step
        self.optim_config = normalize_optim_config(optim)
        self.scheduler_config = _plain(scheduler) if scheduler else None
        # Fail now, not after the Trainer has started: name, backend, device, hyperparameter names and types.
        spec = get_spec(self.optim_config["name"])
        check_available(spec)
        resolve_hyperparameters(spec, {k: v for k, v in self.optim_config.items() if k != "name"})
        if self.scheduler_config is not None and not isinstance(self.scheduler_config, dict):
            raise HyperparameterError(f"scheduler must be a mapping like {{'name': 'cosine'}}; got {scheduler!r}.")
        if spec.train_eval_switch and self.scheduler_config and self.scheduler_config.get("name") != "constant":
            rank_zero_warn(
                f"{spec.name!r} is schedule-free: a decaying LR schedule works against it. Use scheduler=constant "
                "(its own warmup_steps hyperparameter handles warmup)."
            )
        if optim is None and type(self) not in _announced_default:
            # A default is what a Lightning user expects from an optional argument; training the default without a
            # word is not (a forgotten `optim=optim` in super().__init__ looks like it trained what was asked).
            _announced_default.add(type(self))
            rank_zero_warn(
                f"{type(self).__name__}: no optim= reached OptimizerMixin.__init__, so it trains {DEFAULT_OPTIM} "
                f"(lr={self.lr:g}). Choose with super().__init__(optim={{'name': 'adamw_8bit', 'lr': 1e-4}}); "
                "`lit-optim list` shows every name."
            )

    @property
    def lr(self) -> float:
        """The optimizer's learning rate: ``optim["lr"]``, else the optimizer's default (Lightning's LR finder)."""
        lr = self.optim_config.get("lr")
        if lr is None:
            lr = accepted_arguments(get_spec(self.optim_config["name"])).get("lr")
        return float(lr) if isinstance(lr, (int, float)) else 0.0

    @lr.setter
    def lr(self, value: float) -> None:
        # The LR finder's update_attr=True lands here: the next configure_optimizers builds with it, and a saved
        # hparams.optim (a name or a mapping) says so too, so a checkpoint records the LR that was trained.
        self.optim_config["lr"] = float(value)
        hparams = getattr(self, "_hparams", None)
        if hparams is not None and "optim" in hparams:  # a name, a mapping, or None (the default)
            hparams["optim"] = {**normalize_optim_config(hparams["optim"]), "lr": float(value)}

    def configure_optimizers(self):
        trainer = self._trainer
        if trainer is not None:
            check_strategy(trainer)
            check_accumulation(trainer.accumulate_grad_batches, "Trainer(accumulate_grad_batches=...)")
        cfg = dict(self.optim_config)
        name = cfg.pop("name")
        optimizer = build_optimizer(self, name, original_shapes=_fsdp1_shapes(trainer), **cfg)
        keep_tensor_lrs(optimizer)
        info = optimizer.lit_optim
        if trainer is not None:
            # Optimizers with their own Trainer requirements (in-backward) say so first, with specific reasons.
            check = getattr(optimizer, "check_trainer", None)
            if callable(check):
                check(trainer, self)
            check_trainer_compatibility(info.spec, trainer, self.device.type)
        rank_zero_info(f"lit_optim: {name} -> {info.spec.target.replace(':', '.')}; {info.plan.summary()}")
        if info.embedding_32bit_params:
            rank_zero_info(f"lit_optim: {info.embedding_32bit_params:,} embedding params keep 32-bit state.")
        if self.scheduler_config is None:
            return optimizer
        total = trainer.estimated_stepping_batches if trainer is not None else 0
        if total <= 0 or total == float("inf"):
            raise HyperparameterError(
                "An LR schedule needs a finite number of steps: set trainer.max_steps (or max_epochs with a sized "
                "dataloader), or use scheduler=null."
            )
        scheduler = build_scheduler(optimizer, self.scheduler_config, int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning calls this with the loaded checkpoint before restoring anything from it; no second read.
        super().on_load_checkpoint(checkpoint)
        from lightning.pytorch.strategies import FSDPStrategy
        from lightning.pytorch.trainer.states import TrainerFn

        trainer = self._trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return  # load_from_checkpoint, validate, test: no optimizer state is restored

        path = trainer.ckpt_path or "<checkpoint>"
        check_optimizer(checkpoint, self.optim_config["name"], path)
        if not isinstance(trainer.strategy, FSDPStrategy):  # FSDP1 holds flattened shards, not the model's shapes
            check_model(checkpoint, self, path, strict=getattr(self, "strict_loading", True))

    @with_lifecycle
    def configure_callbacks(self):
        return super().configure_callbacks()
