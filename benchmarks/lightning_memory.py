"""Peak GPU memory of the low-rank and in-backward optimizers inside Lightning: `Trainer.fit` of lit_optim's own
`LanguageModelTask` (the `OptimizerMixin` path users take), bf16-mixed, with and without activation checkpointing.

`lowrank_memory.py` measures the optimizers in a plain loop; this measures what a Lightning user gets: the mixin's
param groups, the in-backward hooks installed by the mixin, Lightning's closure and precision plugin, and the mixin's
release of gradients after each step (rows marked "grads kept" turn it off). Every
configuration is one `Trainer.fit` in this one process, on a freshly built model; between fits the previous module,
trainer and optimizer are freed and the allocator's peak is reset when training starts. For each it reports

- state:  optimizer state bytes at the end of training, counted from the real storages;
- peak:   torch.cuda.max_memory_allocated during fit, minus what was allocated when training started (the weights);
- step:   median wall time of a training step after the first (Lightning's whole step, logging off).

GPU (the ~1B Llama of lowrank_memory.py, fp32 weights, precision "bf16-mixed", 1 x 1024 tokens, rank 512):

    python benchmarks/lightning_memory.py --out lightning_memory.json
    python benchmarks/lightning_memory.py --gradient-checkpointing --out lightning_memory_ckpt.json

CPU smoke test (tiny Llama, seconds; what CI runs):

    python benchmarks/lightning_memory.py --tiny
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lowrank_memory
from lowrank_memory import llama_1b, llama_tiny

from lit_optim.state_bytes import total_state_bytes
from lit_optim.task.data import SyntheticTextDataModule
from lit_optim.task.module import LanguageModelTask

# (label, optim node as a user writes it, OptimizerMixin's release_grads_after_step). "rank" is filled in from --rank.
# The "grads kept" rows are Lightning's own behaviour: gradients live on until the next step's closure zeroes them.
CONFIGS = [
    ("adamw_torch", {"name": "adamw_torch"}, True),
    ("adamw_torch, grads kept", {"name": "adamw_torch"}, False),
    ("adamw_torch in_backward", {"name": "adamw_torch", "in_backward": True}, True),
    ("galore_adamw", {"name": "galore_adamw", "rank": None}, True),
    ("galore_adamw, grads kept", {"name": "galore_adamw", "rank": None}, False),
    ("galore_adamw_8bit_layerwise", {"name": "galore_adamw_8bit_layerwise", "rank": None}, True),
    ("apollo_mini", {"name": "apollo_mini"}, True),
    ("adam_mini", {"name": "adam_mini"}, True),
    ("lomo", {"name": "lomo"}, True),
]


class PeakMemory(Callback):
    """Allocator peak from the start of training, state bytes at its end, and per-step wall times."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.base = self.peak = self.state = None
        self._t0 = 0.0

    def _sync(self, trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(trainer)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(trainer)
        self.times.append(time.perf_counter() - self._t0)

    def on_train_end(self, trainer, pl_module) -> None:
        # Before teardown moves the state to the CPU.
        self.state = total_state_bytes(trainer.optimizers[0])
        if self.base is not None:
            self.peak = torch.cuda.max_memory_allocated()


def run_one(label: str, optim: dict, release: bool, args, device: str) -> dict:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    L.seed_everything(0, verbose=False)
    model = {"arch": "llama", **(llama_tiny if args.tiny else llama_1b)(args.vocab),
             "gradient_checkpointing": args.gradient_checkpointing}
    # The model is built by Lightning's configure_model hook, on the training device.
    module = LanguageModelTask(model=model, optim=optim, release_grads_after_step=release)
    data = SyntheticTextDataModule(vocab_size=args.vocab, seq_len=args.seq, batch_size=args.batch,
                                   train_tokens=(args.steps + 1) * args.batch * (args.seq + 1), val_tokens=args.seq + 1)
    probe = PeakMemory()
    trainer = L.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_steps=args.steps,
        precision="bf16-mixed" if device == "cuda" else "32-true", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[probe],
    )
    trainer.fit(module, data)
    row = {
        "label": label, "optim": optim, "release_grads_after_step": release,
        "class": type(trainer.optimizers[0]).__name__,
        "global_step": trainer.global_step, "state_bytes": probe.state,
        "weights_bytes": sum(p.numel() * p.element_size() for p in module.parameters()),
        "peak_above_start_bytes": None if probe.peak is None else probe.peak - probe.base,
        "first_step_ms": probe.times[0] * 1e3,
        "step_ms": statistics.median(probe.times[1:]) * 1e3 if len(probe.times) > 1 else probe.times[0] * 1e3,
    }
    del trainer, module, data, probe
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


COLUMNS = [("state", "state_bytes", 10, "bytes"), ("peak-start", "peak_above_start_bytes", 15, "bytes"),
           ("step ms", "step_ms", 9, "ms"), ("1st step ms", "first_step_ms", 12, "ms")]


def table(rows: list[dict], unit: str) -> str:
    return lowrank_memory.table(rows, COLUMNS, unit)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny Llama on the CPU (a smoke test of seconds)")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing in the model")
    ap.add_argument("--vocab", type=int, default=None, help="default 32000 (256 with --tiny)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024; 32 with --tiny)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rank", type=int, default=None, help="GaLore rank (default 512; 16 with --tiny)")
    ap.add_argument("--names", nargs="*", default=None, help="labels to run (default: all; see CONFIGS)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    args.vocab = args.vocab or (256 if args.tiny else 32000)
    args.seq = args.seq or (32 if args.tiny else 1024)
    args.rank = args.rank or (16 if args.tiny else 512)
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if not args.tiny and device != "cuda":
        print("no CUDA GPU: use --tiny for the CPU smoke test", file=sys.stderr)
        return 2
    unit = "MiB" if args.tiny else "GiB"

    rows = []
    for label, optim, release in CONFIGS:
        if args.names and label not in args.names:
            continue
        optim = {"lr": 1e-4, **{k: (args.rank if k == "rank" else v) for k, v in optim.items()}}
        try:
            rows.append(run_one(label, optim, release, args, device))
        except Exception as err:  # noqa: BLE001 - one failing configuration must not hide the others
            rows.append({"label": label, "optim": optim, "error": f"{type(err).__name__}: {err}"})
        print(table(rows[-1:], unit).splitlines()[-1], flush=True)
    print()
    print(table(rows, unit))
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "lightning": L.__version__, "tiny": args.tiny, "gradient_checkpointing": args.gradient_checkpointing,
            "precision": "bf16-mixed" if device == "cuda" else "32-true", "vocab": args.vocab, "batch": args.batch,
            "seq": args.seq, "steps": args.steps, "rank": args.rank}
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
