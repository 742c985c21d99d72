"""The Hydra entry point behind `lit-optim train`: config -> module, data, callbacks, logger, Trainer -> fit.

Everything the config can get wrong is caught while the objects are built, before the Trainer starts. Lightning and
the model code are imported only once Hydra has composed the config, so a bad override is reported without them.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lit_optim.errors import IncompatibleConfigError, LitOptimError, OutOfDeviceMemoryError
from lit_optim.noise import one_copy_of_each_line, quiet_import_noise

quiet_import_noise()  # before any backend is imported

log = logging.getLogger("lit_optim")


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def build_logger(cfg: DictConfig | None):
    """Instantiate the configured logger; a missing or failing W&B falls back to CSV instead of stopping the run."""
    import lightning as L
    from lightning.pytorch.utilities import rank_zero_warn

    if not cfg or "_target_" not in cfg:
        return False
    if "Wandb" in cfg._target_:
        if importlib.util.find_spec("wandb") is None:
            rank_zero_warn("logger=wandb but wandb is not installed (pip install wandb); logging to CSV instead.")
            return L.pytorch.loggers.CSVLogger(save_dir=cfg.get("save_dir") or ".", name="csv")
        try:
            from lit_optim.wandb_start import wandb_logger

            logger = wandb_logger(cfg)  # named after the job; offline at once when the server cannot be used
            _ = logger.experiment  # starts the run now, so a failure surfaces here and not mid-training
            return logger
        except Exception as err:  # noqa: BLE001 - W&B must never stop training
            rank_zero_warn(f"W&B could not start ({type(err).__name__}: {err}); logging to CSV instead.")
            return L.pytorch.loggers.CSVLogger(save_dir=cfg.get("save_dir") or ".", name="csv")
    return instantiate(cfg)


def build_run(cfg: DictConfig):
    """Everything `train` needs, constructed (and validated) but not started."""
    import lightning as L
    import torch

    from lit_optim.task.module import LanguageModelTask

    if str(cfg.trainer.get("accelerator")) in ("gpu", "cuda") and not torch.cuda.is_available():
        # Said before an 8B model is built on the CPU only for Lightning to refuse the GPU setting afterwards.
        raise IncompatibleConfigError(
            f"trainer.accelerator={cfg.trainer.accelerator} but this machine has no CUDA GPU. Run on a GPU machine, or "
            "add trainer.accelerator=cpu (with a model that fits in CPU memory)."
        )
    L.seed_everything(cfg.seed, workers=True)
    module = LanguageModelTask(
        model=_container(cfg.model),
        optim=_container(cfg.optim),
        scheduler=_container(cfg.scheduler) if cfg.get("scheduler") else None,
        release_grads_after_step=cfg.get("release_grads_after_step", True),
    )
    datamodule = instantiate(cfg.data)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    if cfg.get("max_device_memory_gib") is not None:
        from lit_optim.callbacks.memory_budget import DeviceMemoryBudget

        callbacks.append(DeviceMemoryBudget(cfg.max_device_memory_gib))
    logger = build_logger(cfg.get("logger"))
    if not logger:
        # Lightning refuses a LearningRateMonitor without a logger; with logger=none there is nothing to log to.
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)]
    if cfg.trainer.get("enable_progress_bar", True) and not any(
        isinstance(c, L.pytorch.callbacks.ProgressBar) for c in callbacks
    ):
        # Lightning picks its Rich bar whenever `rich` is installed (transformers brings it), and that bar prints
        # nothing until the end when the output is not a terminal; the tqdm bar shows the loss live either way.
        callbacks.append(L.pytorch.callbacks.TQDMProgressBar())
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    if logger:
        trainer.logger.log_hyperparams({"config": _container(cfg)})
    return module, datamodule, trainer


def train(cfg: DictConfig) -> dict[str, float]:
    import torch

    from lit_optim.run_summary import print_run_summary
    from lit_optim.threads import CpuThreads

    one_copy_of_each_line()  # Hydra has set up logging by now
    module, datamodule, trainer = build_run(cfg)
    trainer.callbacks.append(CpuThreads(cfg.get("torch_threads")))
    if not cfg.get("validate", True):
        trainer.limit_val_batches = 0
    module.release_after_fit = True  # nothing in this process uses the weights after fit (see the module's hook)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    except torch.OutOfMemoryError as err:
        from lit_optim.callbacks.memory_budget import out_of_memory_message

        raise OutOfDeviceMemoryError(
            out_of_memory_message(cfg.get("max_device_memory_gib"), module.optim_config.get("name"))) from err
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("final metrics: %s", metrics)
    print_run_summary(trainer, cfg)
    return metrics


def _config_path() -> str:
    """`pkg://lit_optim.conf` when installed; the checkout's conf/ when run from a plain (uninstalled) source tree."""
    import importlib.util
    from pathlib import Path

    try:
        if importlib.util.find_spec("lit_optim.conf") is not None:
            return "pkg://lit_optim.conf"
    except ModuleNotFoundError:
        pass
    return str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=_config_path(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except Exception as err:
        # A configuration problem, found before step 1: one line that names it and the fix, no traceback. Hydra's
        # instantiate wraps errors from the objects it builds (data module, callbacks), so look through the chain.
        cause = err
        while cause is not None and not isinstance(cause, LitOptimError):
            cause = cause.__cause__
        if cause is None:
            raise
        print(f"lit-optim: {cause}", file=sys.stderr)
        sys.exit(getattr(cause, "exit_code", 2))
    # Returned for Hydra sweepers (e.g. optuna) that optimise a scalar.
    return metrics.get("val/loss", metrics.get("train/loss"))


if __name__ == "__main__":
    main()
