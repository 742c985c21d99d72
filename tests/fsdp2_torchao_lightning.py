"""Run by tests/test_fsdp2_resume.py (slow): torchao's low-bit AdamW through Lightning's ModelParallelStrategy (FSDP2)
on two CPU processes (gloo), with lit_optim's default compile cache (one directory for both ranks, pointed at DIR by
LIT_OPTIM_COMPILE_CACHE), as a user's training run would have it.

    python tests/fsdp2_torchao_lightning.py DIR name straight  # 2K steps, a (DCP directory) checkpoint at step K
    python tests/fsdp2_torchao_lightning.py DIR name resume    # new processes: resume from step K to 2K

The TinyLM's embedding and output head are (129, 128): 65 + 64 rows over 2 ranks, so torchao's own per-shard choice
would differ between ranks (lit_optim decides per parameter). Lightning starts rank 1 by running this script again;
each rank saves its parameter shards and optimizer state after the last step to DIR/name/MODE/rank{R}.pt.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

K = 3
MODEL = {"arch": "tiny", "vocab_size": 129, "d_model": 128, "n_layers": 1, "n_heads": 2, "max_seq_len": 16}


def main(root: Path, name: str, mode: str) -> None:
    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here.parent), str(here)]
    import lightning as L
    from fsdp2_torchao import snapshot
    from harness import make_data
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lit_optim.task.module import LanguageModelTask

    ShardedTask = LanguageModelTask  # shards each block, then the model, in configure_model (lit_optim.task.fsdp2)

    warnings.filterwarnings("ignore")
    L.seed_everything(0, verbose=False)
    resume = mode == "resume"
    ckpt = root / name / "ckpt"
    module = ShardedTask(model=MODEL, optim={"name": name, "lr": 1e-2, "weight_decay": 0.1})
    callbacks = [] if resume else [ModelCheckpoint(dirpath=str(ckpt), every_n_train_steps=K, save_top_k=-1,
                                                   filename="{step}")]
    # Lightning's defaults would make the 2 devices a tensor-parallel mesh (data_parallel_size = number of nodes):
    # FSDP2 over a 1-rank mesh, whole parameters on each rank. Both devices shard here.
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = L.Trainer(max_steps=2 * K, accelerator="cpu", devices=2, strategy=strategy, logger=False,
                        enable_checkpointing=not resume, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks,
                        default_root_dir=str(root / name / mode))
    data = make_data(vocab_size=129, seq_len=16, batch_size=4, train_tokens=4096, val_tokens=256)
    trainer.fit(module, data, ckpt_path=str(ckpt / f"step={K}.ckpt") if resume else None)
    out = root / name / mode
    out.mkdir(parents=True, exist_ok=True)
    snap = snapshot(module.model, trainer.optimizers[0])
    snap["global_step"] = trainer.global_step
    snap["cache_dir"] = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    torch.save(snap, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
