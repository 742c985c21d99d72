"""The few lines `lit-optim train` prints when a run ends: what the optimizer state cost and where it lived, speed,
peak memory, the final loss, and where the logs are with how to look at them.

The numbers are the monitors' last readings (each monitor keeps what it logged last, with any logger or none) and
Lightning's `callback_metrics`; nothing is measured again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

WHERE = {"gpu": "GPU memory", "managed": "CUDA managed (paged) memory", "cpu_pinned": "pinned host memory",
         "cpu": "host memory"}


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _rel(path: str | Path) -> str:
    """`path` relative to the working directory when it is under it (shorter to copy), else as given."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve())) or "."
    except (ValueError, OSError):
        return str(path)


def monitor_metrics(trainer) -> dict[str, float]:
    """What the monitoring callbacks logged last, merged."""
    out: dict[str, float] = {}
    for callback in trainer.callbacks:
        last = getattr(callback, "last_metrics", None)
        if isinstance(last, dict):
            out.update(last)
    return out


def log_lines(trainer, run_dir: str | None) -> list[str]:
    """Where the run and each logger wrote, and the command that shows it."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    lines = []
    if run_dir:
        kept = [name for name in (".hydra", "train.log", "checkpoints") if (Path(run_dir) / name).exists()]
        lines.append(f"run directory: {_rel(run_dir)}" + (f" ({', '.join(kept)})" if kept else ""))
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            run = getattr(logger, "_experiment", None)  # never start a run only to say where it is
            if run is None or not getattr(run, "dir", None):
                continue
            path = _rel(Path(run.dir).parent)
            if getattr(run.settings, "mode", "") in ("offline", "dryrun"):
                lines.append(f"W&B, offline: {path}")
                lines.append(f"  upload it with `wandb sync {path}`; read it here with "
                             f"lit_optim.wandb_offline.OfflineRun.find('{path}')")
            else:
                lines.append(f"W&B: {getattr(run, 'url', None) or path}")
        elif isinstance(logger, CSVLogger):
            lines.append(f"CSV: {_rel(Path(logger.log_dir) / 'metrics.csv')}")
        elif isinstance(logger, TensorBoardLogger):
            lines.append(f"TensorBoard: `tensorboard --logdir {_rel(logger.log_dir)}`")
        else:
            lines.append(f"{type(logger).__name__}: {_rel(logger.log_dir) if logger.log_dir else '(no directory)'}")
    if not trainer.loggers:
        lines.append("no logger (logger=none): the numbers above are all that was kept")
    return lines


def summary_lines(trainer, optimizer: str | None, run_dir: str | None = None) -> list[str]:
    m = {**monitor_metrics(trainer), **{k: float(v) for k, v in trainer.callback_metrics.items()}}
    losses = ", ".join(f"{k} {m[k]:.4g}" for k in ("train/loss", "val/loss") if k in m)
    head = f"lit-optim: finished {optimizer or 'training'} after {trainer.global_step} optimizer steps"
    lines = [head + (f": {losses}" if losses else "")]
    if "optim_state/bytes" in m:
        where = [WHERE.get(k, k) for k in WHERE if m.get(f"optim_state/bytes_{k}", 0) > 0]
        lines.append(f"  optimizer state: {m['optim_state/bytes_per_param']:.3g} bytes/param "
                     f"({_size(m['optim_state/bytes'])}, {m['optim_state/ratio_to_adamw_fp32']:.0%} of fp32 AdamW's)"
                     + (f" in {' + '.join(where)}" if where else ""))
    speed = []
    if "throughput/tokens_per_sec" in m:
        speed.append(f"{m['throughput/tokens_per_sec']:,.0f} tokens/s (last logging interval)")
    if "memory/peak_allocated_bytes" in m:
        speed.append(f"peak GPU memory {_size(m['memory/peak_allocated_bytes'])} allocated (last interval)")
    if m.get("memory/managed_bytes"):
        speed.append(f"{_size(m['memory/managed_bytes'])} managed")
    if "memory/host_peak_rss_bytes" in m:
        speed.append(f"peak host memory {_size(m['memory/host_peak_rss_bytes'])} (process RSS)")
    if speed:
        lines.append("  " + "; ".join(speed))
    lines.extend("  " + line for line in log_lines(trainer, run_dir))
    return lines


def print_run_summary(trainer, cfg: Any) -> None:
    """Print the summary on rank 0 (to stdout, after the progress bar has finished)."""
    if not trainer.is_global_zero:
        return
    optim = cfg.get("optim") or {}
    print("\n".join(summary_lines(trainer, optim.get("name"), cfg.get("output_dir"))), flush=True)
