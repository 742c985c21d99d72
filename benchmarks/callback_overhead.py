"""Training-step time with every lit_optim monitor on vs. off, interleaved in one process.

    python benchmarks/callback_overhead.py --out overhead.json             # ~1B Llama, bf16-mixed, one GPU
    python benchmarks/callback_overhead.py --tiny --out overhead.json      # toy size, CPU, seconds

The model is built once (Llama architecture from transformers' LlamaConfig: hidden 2048, 16 layers, ~1.0B params;
`--tiny`: lit_optim's TinyLM). Each trial fits it for `--steps` optimizer steps twice, once with the monitors
(OptimizerStateMonitor, SpeedMonitor, StepTimingMonitor, DeviceMemoryMonitor, WandbExtras; `--monitors` picks some)
and once without, the order alternating between trials; both arms log to a CSV logger at the same interval, so only
the monitors differ.
A stopwatch callback (in both arms) synchronises twice per fit -- after the warm-up steps and after the last step --
and the step time is the mean over the steps between. The overhead is median(on) / median(off) - 1.
Prints a table; writes the numbers, the settings and the monitors' last readings as JSON to `--out`.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

LLAMA_1B = {
    "arch": "llama", "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
TINY = {"arch": "tiny", "vocab_size": 256, "d_model": 64, "n_layers": 2, "n_heads": 2, "max_seq_len": 64}
MONITORS = ("optim_state", "throughput", "step_timing", "device_memory", "wandb_extras")


def make_monitors(names: list[str], log_every: int) -> list:
    from lit_optim.callbacks import (
        DeviceMemoryMonitor,
        OptimizerStateMonitor,
        SpeedMonitor,
        StepTimingMonitor,
        WandbExtras,
    )

    make = {"optim_state": OptimizerStateMonitor, "throughput": SpeedMonitor, "step_timing": StepTimingMonitor,
            "device_memory": DeviceMemoryMonitor, "wandb_extras": lambda _: WandbExtras()}
    return [make[name](log_every) for name in names]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="toy model on the CPU (a smoke test; timings mean little)")
    p.add_argument("--steps", type=int, help="optimizer steps per fit (default 60; tiny 8)")
    p.add_argument("--warmup", type=int, help="steps not timed at the start of each fit (default 10; tiny 3)")
    p.add_argument("--trials", type=int, help="on/off pairs (default 3; tiny 1)")
    p.add_argument("--optim", help="registry name (default adamw_torch_fused on GPU, adamw_torch on CPU)")
    p.add_argument("--batch-size", type=int, help="sequences per step (default 4; tiny 4)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 1024; tiny 32)")
    p.add_argument("--precision", help="Lightning precision (default bf16-mixed on GPU, 32-true on CPU)")
    p.add_argument("--log-every", type=int, default=10, help="logging interval of Lightning and the monitors")
    p.add_argument("--monitors", default=",".join(MONITORS),
                   help=f"comma-separated monitors of the 'on' arm (default all: {','.join(MONITORS)})")
    p.add_argument("--out", required=True, help="path of the JSON results")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.tiny
    defaults = dict(steps=8, warmup=3, trials=1, batch_size=4, seq_len=32) if args.tiny else dict(
        steps=60, warmup=10, trials=3, batch_size=4, seq_len=1024)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.optim = args.optim or ("adamw_torch_fused" if gpu else "adamw_torch")
    args.precision = args.precision or ("bf16-mixed" if gpu else "32-true")
    args.accelerator = "gpu" if gpu else "cpu"
    if args.warmup >= args.steps:
        p.error("--warmup must be smaller than --steps")
    args.monitors = [m.strip() for m in args.monitors.split(",") if m.strip()]
    unknown = sorted(set(args.monitors) - set(MONITORS))
    if unknown:
        p.error(f"unknown monitors {unknown}; choose from {', '.join(MONITORS)}")
    return args


class Stopwatch:
    """Times the steps after the warm-up: two synchronisations per fit, in both arms alike. Also the time the Python
    garbage collector stopped the host in that window (it adds to the step time when the host sets the pace)."""

    def __new__(cls, warmup: int):
        from lightning.pytorch import Callback

        class _Stopwatch(Callback):
            def __init__(self):
                self.t0 = self.t1 = None
                self.steps = 0
                self.gc_s, self._gc_start = 0.0, None

            def _gc(self, phase, info):
                if self.t0 is None or self.t1 is not None:
                    return
                if phase == "start":
                    self._gc_start = time.perf_counter()
                elif self._gc_start is not None:
                    self.gc_s += time.perf_counter() - self._gc_start
                    self._gc_start = None

            def _now(self, trainer) -> float:
                if trainer.strategy.root_device.type == "cuda":
                    torch.cuda.synchronize()
                return time.perf_counter()

            def on_train_start(self, trainer, pl_module):
                gc.callbacks.append(self._gc)

            def on_train_end(self, trainer, pl_module):
                gc.callbacks.remove(self._gc)

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step == warmup:
                    self.t0 = self._now(trainer)
                    self.steps = 0
                elif self.t0 is not None:
                    self.steps += 1
                if trainer.global_step == trainer.max_steps:
                    self.t1 = self._now(trainer)

            @property
            def step_ms(self) -> float:
                return 1000.0 * (self.t1 - self.t0) / self.steps

            @property
            def gc_ms_per_step(self) -> float:
                return 1000.0 * self.gc_s / self.steps

        return _Stopwatch()


def make_loader(args, vocab: int, total_batches: int):
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (total_batches * args.batch_size, args.seq_len + 1), generator=g)
    return DataLoader(list(tokens), batch_size=args.batch_size, shuffle=False, drop_last=True,
                      pin_memory=args.accelerator == "gpu", num_workers=0, collate_fn=torch.stack)


def run(args) -> dict:
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from lit_optim.task.module import LanguageModelTask

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lit_optim").setLevel(logging.WARNING)
    model_cfg = TINY if args.tiny else LLAMA_1B
    if args.tiny:
        model_cfg = {**model_cfg, "max_seq_len": max(model_cfg["max_seq_len"], args.seq_len)}
    L.seed_everything(0, verbose=False)
    t = time.perf_counter()
    module = LanguageModelTask(model=model_cfg, optim={"name": args.optim, "lr": 1e-4})
    module.configure_model()  # built once here and reused by every fit (Lightning's hook then keeps it)
    build_s = time.perf_counter() - t
    params = sum(p.numel() for p in module.parameters())
    loader = make_loader(args, model_cfg["vocab_size"], args.steps)
    results = {"on": [], "off": []}
    gc_ms = {"on": [], "off": []}
    readings: dict[str, float] = {}
    workdir = Path(tempfile.mkdtemp(prefix="callback_overhead_"))
    for trial in range(args.trials):
        for arm in (("on", "off") if trial % 2 == 0 else ("off", "on")):
            watch = Stopwatch(args.warmup)
            monitors = make_monitors(args.monitors, args.log_every) if arm == "on" else []
            trainer = L.Trainer(
                max_steps=args.steps, accelerator=args.accelerator, devices=1, precision=args.precision,
                logger=CSVLogger(str(workdir), name=f"{arm}{trial}"), log_every_n_steps=args.log_every,
                callbacks=[watch, *monitors], enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            )
            trainer.fit(module, train_dataloaders=loader)
            results[arm].append(watch.step_ms)
            gc_ms[arm].append(watch.gc_ms_per_step)
            print(f"trial {trial} monitors {arm:>3}: {watch.step_ms:9.2f} ms/step (garbage collection "
                  f"{watch.gc_ms_per_step:.2f} ms/step)", flush=True)
            if arm == "on":
                for cb in monitors:
                    readings.update(getattr(cb, "last_metrics", {}))
                    readings.update(getattr(cb, "warmup_metrics", {}))
            del trainer
    median = {arm: statistics.median(v) for arm, v in results.items()}
    paired = [on / off - 1 for on, off in zip(results["on"], results["off"])]
    device = torch.cuda.get_device_name() if args.accelerator == "gpu" else platform.processor() or "cpu"
    return {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "model": {**model_cfg, "params": params, "build_seconds": round(build_s, 2)},
        "device": device, "torch": torch.__version__,
        "step_ms": results, "median_step_ms": median, "gc_ms_per_step": gc_ms,
        "overhead": median["on"] / median["off"] - 1, "paired_overhead": paired,
        "tokens_per_step": args.batch_size * args.seq_len,
        "monitor_readings": {k: v for k, v in sorted(readings.items())},
    }


def table(result: dict) -> str:
    on, off = result["step_ms"]["on"], result["step_ms"]["off"]
    r = result["monitor_readings"]
    lines = [
        f"model: {result['model']['arch']} {result['model']['params'] / 1e6:,.1f}M params, {result['device']}, "
        f"{result['settings']['optim']}, {result['settings']['precision']}, "
        f"{result['tokens_per_step']} tokens/step, {result['settings']['steps']} steps/fit "
        f"({result['settings']['warmup']} untimed), {result['settings']['trials']} trials",
        "| monitors | step ms (median) | step ms (each trial) |",
        "|---|---|---|",
        f"| off | {result['median_step_ms']['off']:.2f} | {', '.join(f'{x:.2f}' for x in off)} |",
        f"| on  | {result['median_step_ms']['on']:.2f} | {', '.join(f'{x:.2f}' for x in on)} |",
        f"overhead: {100 * result['overhead']:+.2f}% (median); per trial: "
        + ", ".join(f"{100 * x:+.2f}%" for x in result["paired_overhead"]),
    ]
    for key in ("throughput/tokens_per_sec", "throughput/mfu", "timing/optimizer_step_ms",
                "timing/optimizer_step_share", "timing/warmup/first_optimizer_step_ms", "optim_state/bytes",
                "optim_state/bytes_per_param", "memory/peak_allocated_bytes"):
        if key in r:
            lines.append(f"{key}: {r[key]:.4g}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    if args.tiny:
        torch.set_num_threads(1)  # a toy model gains nothing from threads, and loses much on a busy machine
    result = run(args)
    print(table(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
