"""The Hydra entry point behind `lit-optim train`: config -> module, data, callbacks, logger, Trainer -> fit.

Everything the config can get wrong is caught while the objects are built, before the Trainer starts: the seed,
accumulation, data against model (`lit_optim.preflight`), writable directories, and the checkpoint to resume from
(`lit_optim.resume`). Lightning and the model code are imported only once Hydra has composed the config, so a bad
override is reported without them.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lit_optim.errors import IncompatibleConfigError, LitOptimError, OutOfDeviceMemoryError
from lit_optim.noise import one_copy_of_each_line, quiet_import_noise
from lit_optim.preflight import check_accumulation, check_data_fits_model, check_seed, check_writable

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

    check_seed(cfg.get("seed"))
    check_accumulation(cfg.trainer.get("accumulate_grad_batches", 1))
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
    check_data_fits_model(datamodule, module.model_config)
    named_callbacks = {name: instantiate(c) for name, c in (cfg.get("callbacks") or {}).items() if c}
    checkpoint_dirs = check_run_dirs(cfg, named_callbacks)
    # Resolved here, before the logger starts a run: `last` and `resume=` become a file, checked (see resume.py).
    cfg.ckpt_path = checked_ckpt_path(cfg, module, checkpoint_dirs)
    callbacks = list(named_callbacks.values())
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
    if cfg.get("ckpt_path"):
        from lit_optim import resume

        resume.check_ranks(cfg.ckpt_path, trainer.world_size)
    if logger:
        trainer.logger.log_hyperparams({"config": _container(cfg)})
    return module, datamodule, trainer


def check_run_dirs(cfg: DictConfig, named_callbacks: dict[str, Any]) -> list[str]:
    """The run, logger and checkpoint directories can be written (not only at the first checkpoint); returns the
    checkpoint directories."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    check_writable(cfg.get("output_dir"), "output_dir")
    logger_cfg = cfg.get("logger")
    if logger_cfg and logger_cfg.get("save_dir"):
        check_writable(logger_cfg.save_dir, "logger.save_dir")
    checkpoint_dirs = []
    for name, callback in named_callbacks.items():
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            check_writable(callback.dirpath, f"callbacks.{name}.dirpath")
            checkpoint_dirs.append(str(callback.dirpath))
    return checkpoint_dirs


def checked_ckpt_path(cfg: DictConfig, module, checkpoint_dirs: list[str]) -> str | None:
    """`ckpt_path` (or `resume=<run dir>`'s last checkpoint, or `last`) as a file that exists, loads and was written
    with this run's optimizer; None to start afresh."""
    from lit_optim import resume

    ckpt_path, run = cfg.get("ckpt_path"), cfg.get("resume")
    output_dir = Path(str(cfg.get("output_dir") or ".")).resolve()
    if ckpt_path is None and run:
        ckpt_path = str(resume.resume_checkpoint(resume.find_run_dir(str(run)), output_dir, checkpoint_dirs))
        log.info("resume=%s: resuming from %s", run, ckpt_path)
    elif ckpt_path == "last":
        found = resume.last_checkpoint(output_dir, checkpoint_dirs)
        if found is None:
            log.warning("ckpt_path=last: no last checkpoint in this run or an earlier one next to it (%s); "
                        "training from scratch.", output_dir.parent)
            return None
        ckpt_path = str(found)
        log.info("ckpt_path=last: resuming from %s", ckpt_path)
    if ckpt_path is None or ckpt_path in ("hpc", "best", "registry") or str(ckpt_path).startswith("registry:"):
        return ckpt_path  # Lightning's own special values
    checkpoint = resume.read_checkpoint(ckpt_path)
    resume.check_optimizer(checkpoint, module.optim_config["name"], ckpt_path)
    return str(ckpt_path)


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


def _lit_optim_cause(err: BaseException) -> LitOptimError | None:
    # Hydra's instantiate wraps errors from the objects it builds (data module, callbacks): look through the chain.
    cause = err
    while cause is not None and not isinstance(cause, LitOptimError):
        cause = cause.__cause__
    return cause


def _exit_with_message(cause: LitOptimError) -> None:
    """A configuration problem, found before step 1: one line that names it and the fix, no traceback."""
    print(f"lit-optim: {cause}", file=sys.stderr)
    sys.exit(getattr(cause, "exit_code", 2))


@hydra.main(version_base="1.3", config_path=_config_path(), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except Exception as err:
        cause = _lit_optim_cause(err)
        if cause is None:
            raise
        _exit_with_message(cause)
    # Returned for Hydra sweepers (e.g. optuna) that optimise a scalar.
    return metrics.get("val/loss", metrics.get("train/loss"))


def main() -> float | None:
    """`lit-optim train`: `resume=<run dir>` is expanded into that run's overrides before Hydra composes the config."""
    from lit_optim.resume import expand_resume

    try:
        sys.argv = [sys.argv[0], *expand_resume(sys.argv[1:])]
    except LitOptimError as err:
        _exit_with_message(err)
    return _hydra_main()


if __name__ == "__main__":
    main()
