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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_optim.build import _plain, build_optimizer, check_available, resolve_hyperparameters
from lit_optim.errors import HyperparameterError, IncompatibleConfigError
from lit_optim.lifecycle import OptimizerLifecycle
from lit_optim.preflight import check_accumulation
from lit_optim.registry import get_spec
from lit_optim.resume import check_model, check_optimizer
from lit_optim.scheduler import build_scheduler
from lit_optim.spec import CPU, DDP, FSDP2, GRAD_ACCUM, GRAD_CLIP, OptimizerSpec


def normalize_optim_config(optim: str | Mapping[str, Any] | None) -> dict[str, Any]:
    if optim is None:
        optim = "adamw_torch"
    if isinstance(optim, str):
        return {"name": optim}
    cfg = _plain(optim)
    if not isinstance(cfg, dict) or "name" not in cfg:
        raise HyperparameterError(
            f"The optimizer config needs a 'name' (e.g. {{'name': 'adamw_torch', 'lr': 1e-4}}); got {optim!r}."
        )
    cfg.pop("_convert_", None)
    return cfg


def check_trainer_compatibility(spec: OptimizerSpec, trainer, device_type: str) -> None:
    """Known-incompatible combinations of optimizer and Trainer settings, refused with the reason and a fix."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

    strategy = trainer.strategy
    problems = []
    if device_type != "cuda" and CPU not in spec.supports:
        problems.append(f"it runs only on CUDA but the model is on {device_type!r}; use accelerator='gpu'")
    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)) and FSDP2 not in spec.supports:
        problems.append("it does not support FSDP (its state cannot go through FSDP's optimizer state dict); use "
                        "DDP, or a torch/torchao optimizer")
    elif isinstance(strategy, DDPStrategy) and DDP not in spec.supports:
        problems.append("it does not support DDP; train on one device")
    if trainer.gradient_clip_val and GRAD_CLIP not in spec.supports:
        problems.append("it cannot use Trainer(gradient_clip_val=...); remove gradient clipping")
    if trainer.accumulate_grad_batches > 1 and GRAD_ACCUM not in spec.supports:
        problems.append("it cannot accumulate gradients; set accumulate_grad_batches=1")
    if problems:
        raise IncompatibleConfigError(f"Optimizer {spec.name!r} cannot run with this Trainer: " + "; ".join(problems))
    if spec.paged and device_type != "cuda":
        rank_zero_warn(f"{spec.name!r}: paged memory needs CUDA; on {device_type} its state is ordinary memory.")


class OptimizerMixin:
    """Give a LightningModule `configure_optimizers` from lit_optim's registry. Put it before LightningModule."""

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

    def configure_optimizers(self):
        trainer = self._trainer
        if trainer is not None:
            check_accumulation(trainer.accumulate_grad_batches, "Trainer(accumulate_grad_batches=...)")
        cfg = dict(self.optim_config)
        name = cfg.pop("name")
        optimizer = build_optimizer(self, name, **cfg)
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

    def configure_callbacks(self):
        callbacks = super().configure_callbacks()
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else ([callbacks] if callbacks else [])
        return [*callbacks, OptimizerLifecycle()]
