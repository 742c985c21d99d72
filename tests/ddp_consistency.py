"""Run by tests/test_lowrank_ddp.py (Lightning relaunches it for rank 1): train each optimizer name under DDP on two
CPU processes and record, from rank 0, whether the ranks ended with identical parameters and optimizer state.

    python tests/ddp_consistency.py OUT.json name [name ...]
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import TINY_MODEL, make_data, make_module

HP = {"rank": 8, "update_proj_gap": 2}
# torch's Adafactor steps lr x the parameter's RMS: at 1e-2 four steps barely move this model's loss.
LR = {"adafactor_torch": 5e-2}


def _plain(v: torch.Tensor) -> torch.Tensor:
    return v.dequantize() if type(v) is not torch.Tensor and hasattr(v, "dequantize") else v.detach()


def checksum(trainer, pl_module) -> torch.Tensor:
    params = torch.stack([p.detach().double().sum() for p in pl_module.parameters()])
    opt = trainer.optimizers[0]
    # Every state tensor counts: integer codes (lit_optim's fused low-bit) too, and torchao's quantized subclasses
    # through their dequantized values (they implement no reductions).
    state = [_plain(v).double().sum() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return torch.cat([params, torch.stack(state) if state else torch.zeros(1, dtype=torch.float64)])


class Consistency(Callback):
    def __init__(self) -> None:
        self.losses, self.result = [], None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module) -> None:
        gathered = trainer.strategy.all_gather(checksum(trainer, pl_module))  # (world, n)
        self.result = {"ranks": int(gathered.shape[0]), "equal": bool(torch.equal(gathered[0], gathered[1])),
                       "losses": self.losses, "global_step": trainer.global_step}


def main() -> None:
    warnings.filterwarnings("ignore")
    out, names = sys.argv[1], sys.argv[2:]
    results = {}
    for name in names:
        start = time.perf_counter()
        L.seed_everything(0, verbose=False)
        probe = Consistency()
        optim = {"name": name, "lr": LR.get(name, 1e-2), **(HP if name.startswith(("galore", "apollo")) else {})}
        trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, limit_val_batches=0, callbacks=[probe])
        trainer.fit(make_module(optim, model=TINY_MODEL), make_data())
        results[name] = {**probe.result, "seconds": round(time.perf_counter() - start, 1)}
    if trainer.global_rank == 0:
        Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
