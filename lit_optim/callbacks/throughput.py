"""`SpeedMonitor`: samples/s, tokens/s, FLOP/s and MFU through Lightning's throughput utilities, without per-step
host synchronisation.

Lightning's own `ThroughputMonitor` calls ``torch.cuda.synchronize()`` after every batch; this monitor feeds
Lightning's `Throughput` (the same rolling-window arithmetic, world-size scaling and MFU) only on logging steps, where
it synchronises once, so the rates are exact over each logging interval and other steps run unsynchronised.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from typing import Any

import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from lit_optim.callbacks._common import IntervalCallback, record_hyperparams, stepped
from lit_optim.flops import available_flops, resolve_batch_flops


def _resolve_fn(fn: Callable | str | None) -> Callable | None:
    """A callable, or an import path ``"package.module:function"`` (handy in Hydra configs)."""
    if fn is None or callable(fn):
        return fn
    module, _, attr = str(fn).partition(":")
    return getattr(importlib.import_module(module), attr)


def default_model_inputs(pl_module, batch: Any) -> tuple[tuple, dict]:
    """(args, kwargs) `forward` receives for `batch`: ``pl_module.model_inputs(batch)`` when the module defines it,
    else the batch itself (a tensor), its first element (a tuple/list such as ``(x, y)``), or a dict's entries other
    than ``labels`` as keyword arguments."""
    if hasattr(pl_module, "model_inputs"):
        inputs = pl_module.model_inputs(batch)
        return ((inputs,), {}) if not isinstance(inputs, (tuple, dict)) else (
            (inputs, {}) if isinstance(inputs, tuple) else ((), inputs))
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, dict):
        return (), {k: v for k, v in batch.items() if k != "labels"}
    if isinstance(batch, (list, tuple)) and batch:
        return (batch[0],), {}
    return (batch,), {}


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v
    return None


def default_batch_size(args: tuple, kwargs: dict) -> int:
    t = _first_tensor(args, kwargs)
    return int(t.shape[0]) if t is not None and t.ndim else 1


def default_tokens(args: tuple, kwargs: dict) -> int | None:
    """Tokens in a batch: elements of ``input_ids`` or of the first integer tensor (None for non-token inputs)."""
    t = kwargs.get("input_ids") if isinstance(kwargs.get("input_ids"), torch.Tensor) else _first_tensor(args, kwargs)
    if t is None or t.is_floating_point() or t.is_complex():
        return None
    return int(t.numel())


class SpeedMonitor(IntervalCallback):
    """Samples/s, tokens/s, model FLOP/s and MFU per device and over all ranks, from Lightning's `Throughput`.

    FLOPs per batch, in order of preference: the `flops_per_batch` argument; the module's ``flops_per_batch``
    attribute (Lightning's convention); Lightning's `measure_flops` on a meta-device stand-in of the module, run once
    on the first batch; else 6 * trainable parameters * tokens. Peak FLOP/s (for MFU): the `peak_flops` argument, else
    `lit_optim.flops.available_flops` (dense Hopper figures under the names the drivers report, then Lightning's
    table) for the trainer's compute dtype. Rates are measured between logging steps, starting after the first
    `warmup_steps` optimizer steps, and averaged over the last `window_size` - 1 intervals. Under FSDP the module
    holds shards, which the meta measurement and the 6N rule cannot see whole: give `flops_per_batch` there.

    Logged metrics:
        ``throughput/samples_per_sec``, ``throughput/tokens_per_sec``, ``throughput/batches_per_sec``,
        ``throughput/flops_per_sec``: summed over ranks (world size x this device's rate).
        ``throughput/mfu``: model FLOP/s / peak FLOP/s (the same on every device).
        ``throughput/device/samples_per_sec``, ``throughput/device/tokens_per_sec``,
        ``throughput/device/batches_per_sec``, ``throughput/device/flops_per_sec``, ``throughput/device/mfu``: this
        device.
        ``throughput/tokens_seen``, ``throughput/samples_seen``: totals over ranks so far.
    Recorded once in the loggers' hyperparameters, as ``throughput``: ``flops_per_batch``, ``flops_source``
    (``given``, ``module``, ``measured``, ``6N`` or ``unknown``), ``peak_flops_per_device``, ``device``, ``dtype``,
    ``world_size``.

    Args:
        log_every_n_steps: logging interval in optimizer steps; None follows ``Trainer(log_every_n_steps)``.
        window_size: logging points in Lightning's rolling window (2: the rate over the last interval).
        warmup_steps: optimizer steps before measuring starts (compilation, start-up).
        flops_per_batch: FLOPs of one batch's forward + backward on one device, if known.
        peak_flops: peak FLOP/s of one device, overriding the table (needed for MFU on unknown devices).
        measure_flops: measure FLOPs with Lightning's `measure_flops` (else 6 * N * tokens).
        model_inputs_fn: ``fn(pl_module, batch) -> (args, kwargs)`` of `forward` (or ``"module:function"``); default
            `default_model_inputs`.
        batch_size_fn, tokens_fn: ``fn(args, kwargs) -> int`` on those inputs; defaults count the first tensor's
            rows and the integer input's elements.
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        window_size: int = 2,
        warmup_steps: int = 1,
        flops_per_batch: float | None = None,
        peak_flops: float | None = None,
        measure_flops: bool = True,
        model_inputs_fn: Callable | str | None = None,
        batch_size_fn: Callable | str | None = None,
        tokens_fn: Callable | str | None = None,
    ) -> None:
        super().__init__(log_every_n_steps)
        if window_size < 2:
            raise ValueError(f"window_size must be >= 2 (a rate needs two points), got {window_size}")
        if not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an integer >= 1 (the clock starts after it), got {warmup_steps!r}")
        self.window_size, self.warmup_steps = window_size, warmup_steps
        self.flops_per_batch, self.peak_flops, self.measure_flops = flops_per_batch, peak_flops, measure_flops
        self.model_inputs_fn = _resolve_fn(model_inputs_fn) or default_model_inputs
        self.batch_size_fn = _resolve_fn(batch_size_fn) or default_batch_size
        self.tokens_fn = _resolve_fn(tokens_fn) or default_tokens
        self.info: dict[str, Any] = {}
        self._throughput: Throughput | None = None  # rank 0 only: other ranks measure nothing
        self._val_start: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype

        device = trainer.strategy.root_device
        dtype = _plugin_to_compute_dtype(trainer.precision_plugin)
        peak = self.peak_flops if self.peak_flops is not None else available_flops(device, dtype)
        self._throughput = Throughput(available_flops=peak, world_size=trainer.world_size,
                                      window_size=self.window_size)
        self.info = {"peak_flops_per_device": peak, "device": torch.cuda.get_device_name(device)
                     if device.type == "cuda" else device.type, "dtype": str(dtype).removeprefix("torch."),
                     "world_size": trainer.world_size}
        self._flops: float | None = None
        self._t0 = time.perf_counter()
        self._paused = 0.0  # seconds spent in validation, taken out of the training time
        self._val_start: float | None = None
        self._batches = self._samples = self._tokens = 0
        self._flops_since_update = 0.0
        self._has_tokens = True
        self._steps = 0
        self._points = 0  # updates given to Throughput; the first one only starts the clock

    def _sync_now(self, trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        return time.perf_counter()

    def _resolve_flops(self, trainer, pl_module, args, kwargs, tokens) -> None:
        if self.flops_per_batch is not None:
            self._flops, source = float(self.flops_per_batch), "given"
        elif getattr(pl_module, "flops_per_batch", None) is not None:
            self._flops, source = float(pl_module.flops_per_batch), "module"
        elif self.measure_flops:
            self._flops, source = resolve_batch_flops(pl_module, args, kwargs, tokens, warn=rank_zero_warn)
        else:
            from lit_optim.flops import six_n_flops

            n = sum(p.numel() for p in {id(p): p for p in pl_module.parameters() if p.requires_grad}.values())
            self._flops, source = (six_n_flops(n, tokens), "6N") if tokens else (None, "unknown")
        self.info.update(flops_per_batch=self._flops, flops_source=source)
        record_hyperparams(trainer, {"throughput": dict(self.info)})

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._throughput is None:
            return
        args, kwargs = self.model_inputs_fn(pl_module, batch)
        tokens = self.tokens_fn(args, kwargs)
        if "flops_source" not in self.info:
            self._resolve_flops(trainer, pl_module, args, kwargs, tokens)
        self._batches += 1
        self._samples += self.batch_size_fn(args, kwargs)
        if tokens is None:
            self._has_tokens = False
        else:
            self._tokens += tokens
        if self._flops is not None:
            self._flops_since_update += self._flops
        if stepped(trainer):
            self._steps += 1
        if (self._steps == self.warmup_steps and not self._points) or self.is_log_step(trainer):
            self._update(trainer)

    def _update(self, trainer) -> None:
        now = self._sync_now(trainer) - self._t0 - self._paused
        self._throughput.update(
            time=now, batches=self._batches, samples=self._samples,
            lengths=self._tokens if self._has_tokens and self._tokens >= self._samples else None,
            flops=int(self._flops_since_update) if self._flops is not None else None,
        )
        self._flops_since_update = 0.0
        self._points += 1
        if self._points < 2:  # the first point only starts the clock
            return
        self.publish(trainer, self._metrics(self._throughput.compute(), trainer.world_size))

    def _metrics(self, computed: dict[str, float], world_size: int) -> dict[str, float]:
        names = {"samples_per_sec": "samples_per_sec", "batches_per_sec": "batches_per_sec",
                 "items_per_sec": "tokens_per_sec", "flops_per_sec": "flops_per_sec", "mfu": "mfu"}
        out: dict[str, float] = {}
        for src, dst in names.items():
            device_value = computed.get(f"device/{src}")
            if device_value is None:
                continue
            out[f"throughput/device/{dst}"] = device_value
            # Lightning adds the all-rank figures only for world_size > 1; MFU is the same everywhere.
            out[f"throughput/{dst}"] = device_value if src == "mfu" else computed.get(src, device_value * world_size)
        out["throughput/samples_seen"] = self._samples * world_size
        if self._has_tokens:
            out["throughput/tokens_seen"] = self._tokens * world_size
        return out

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._throughput is not None and trainer.is_global_zero and not trainer.sanity_checking:
            self._val_start = self._sync_now(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._val_start is not None and trainer.is_global_zero:
            self._paused += self._sync_now(trainer) - self._val_start
            self._val_start = None
