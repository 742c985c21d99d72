"""GaLore (and optionally APOLLO, Adam-mini, ...) vs AdamW on the built-in task: final loss after a few hundred steps.

Trains lit_optim's TinyLM (the default `model=tiny`: d_model 128, 2 layers, 4 heads) on the generated Markov-chain
data through Lightning with the same warmup + cosine schedule for every optimizer, then prints the final training loss
(mean of the last 20 steps), the validation loss, and each optimizer's gap to AdamW.

GaLore runs at the paper's settings (Zhao et al., 2024): learning rate 0.01, scale 0.25, projector refresh every 200
steps, rank = d_model / 4 (the paper's rank-to-width ratio: 128/512 for 60M ... 512/2048 for 1B; Hugging Face's
default rank 128 would be full rank on this 128-wide model). AdamW: learning rate 1e-2, the best of 1e-3, 3e-3 and 1e-2
on this task at 300 steps (validation loss 0.862, 0.791, 0.785).

    python benchmarks/galore_vs_adamw.py                       # adamw_torch vs galore_adamw, 300 steps, CPU
    python benchmarks/galore_vs_adamw.py --names adamw_torch galore_adamw apollo_adamw adam_mini --steps 500
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lit_optim.task.data import SyntheticTextDataModule
from lit_optim.task.module import LanguageModelTask

MODEL = {"arch": "tiny", "vocab_size": 256, "d_model": 128, "n_layers": 2, "n_heads": 4, "max_seq_len": 128}


class Losses(Callback):
    def __init__(self) -> None:
        self.train: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train.append(float(outputs["loss"]))


def optim_config(name: str, args) -> dict:
    lowrank = {"rank": args.rank, "update_proj_gap": args.gap}
    if name.startswith("galore"):
        return {"name": name, "lr": args.galore_lr, "scale": args.scale, **lowrank}
    if name.startswith("apollo_mini"):
        return {"name": name, "lr": args.apollo_lr, "update_proj_gap": args.gap}
    if name.startswith("apollo"):
        return {"name": name, "lr": args.apollo_lr, **lowrank}
    return {"name": name, "lr": args.adamw_lr}


def train(optim: dict, args) -> dict:
    L.seed_everything(args.seed, verbose=False)
    module = LanguageModelTask(model=MODEL, optim=optim,
                               scheduler={"name": "cosine", "warmup_ratio": 0.1, "min_lr_ratio": 0.1})
    data = SyntheticTextDataModule(vocab_size=256, seq_len=64, batch_size=16, train_tokens=131072, val_tokens=8192,
                                   seed=args.seed)
    losses = Losses()
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=1.0, val_check_interval=None, check_val_every_n_epoch=10**6,
                        callbacks=[losses])
    t0 = time.perf_counter()
    trainer.fit(module, data)
    seconds = time.perf_counter() - t0
    val = trainer.validate(module, data, verbose=False)[0]["val/loss"]
    tail = losses.train[-20:]
    return {"name": optim["name"], "optim": optim, "final_train_loss": sum(tail) / len(tail),
            "val_loss": float(val), "seconds": seconds, "steps": trainer.global_step}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", nargs="+", default=["adamw_torch", "galore_adamw"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rank", type=int, default=MODEL["d_model"] // 4)
    parser.add_argument("--gap", type=int, default=200, help="update_proj_gap")
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--galore-lr", type=float, default=1e-2)
    parser.add_argument("--apollo-lr", type=float, default=1e-2)
    parser.add_argument("--adamw-lr", type=float, default=1e-2, help="also used by every other name")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=str, default=None, help="write results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lit_optim").setLevel(logging.ERROR)

    results = []
    for name in args.names:
        r = train(optim_config(name, args), args)
        results.append(r)
        print(f"{name:24s} final train {r['final_train_loss']:.4f}  val {r['val_loss']:.4f}  ({r['seconds']:.0f} s)",
              flush=True)
    base = next((r for r in results if r["name"] == "adamw_torch"), results[0])
    print(f"\n{args.steps} steps, warmup 10% + cosine; GaLore/APOLLO rank {args.rank}, gap {args.gap}, "
          f"GaLore scale {args.scale}")
    print(f"{'optimizer':24s} {'lr':>8s} {'train loss':>11s} {'val loss':>9s} {'val gap vs ' + base['name']:>24s}")
    for r in results:
        gap = 100.0 * (r["val_loss"] - base["val_loss"]) / base["val_loss"]
        r["val_gap_percent"] = gap
        print(f"{r['name']:24s} {r['optim']['lr']:8.0e} {r['final_train_loss']:11.4f} {r['val_loss']:9.4f} "
              f"{gap:+23.2f}%")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
