"""Run by tests/test_fsdp2_resume.py (slow): torchao's 8-bit/4-bit AdamW built through lit_optim on two CPU processes
(gloo) with an FSDP2-sharded model, checkpointed with torch.distributed.checkpoint.

    python tests/fsdp2_torchao.py straight DIR name [name ...]  # K steps, dcp.save to DIR/name/ckpt, K more steps
    python tests/fsdp2_torchao.py resume   DIR name [name ...]  # new processes: dcp.load, the same K steps

The (129, 128) weight splits 65 + 64 rows: torchao's own choice per shard would give rank 0 fp32 state and rank 1
low-bit (pytorch/ao#4912); lit_optim decides from the whole parameter. Each rank saves its parameter shards, state
(codes and scales of the low-bit subclasses, plain tensors otherwise) and state types, as tests/fsdp2_resume.py does.

Both ranks are given ONE compile cache directory, as on a real machine (torchao compiles its step on DTensors, and
torch's AOTAutograd cache keys those by their global shape): FSDP2_TORCHAO_CACHE=lit_optim (the default) points
lit_optim's persistent cache (LIT_OPTIM_COMPILE_CACHE) at DIR/compile_cache, which lit_optim splits per rank;
FSDP2_TORCHAO_CACHE=user sets TORCHINDUCTOR_CACHE_DIR=DIR/inductor_shared, a user's choice lit_optim never changes.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

K, WORLD, BATCH = 2, 2, 8


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 256), nn.Tanh(), nn.Linear(256, 128), nn.Tanh(), nn.Linear(128, 129))


def batch(step: int, rank: int) -> torch.Tensor:
    x = torch.randn(WORLD * BATCH, 128, generator=torch.Generator().manual_seed(1000 + step))
    return x[rank * BATCH:(rank + 1) * BATCH]


def train(net, opt, steps, rank) -> None:
    for step in steps:
        net(batch(step, rank)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def snapshot(net, opt) -> dict:
    names = {p: n for n, p in net.named_parameters()}
    out = {"params": {n: p.detach().to_local().clone() for n, p in net.named_parameters()}, "state": {}, "types": {}}
    for p, s in opt.state.items():
        for k, v in s.items():
            v = v.to_local() if hasattr(v, "to_local") else v
            key = f"{names[p]}.{k}"
            out["types"][key] = type(v).__name__
            if hasattr(v, "codes"):
                out["state"][key + ".codes"], out["state"][key + ".scale"] = v.codes.clone(), v.scale.clone()
            else:
                out["state"][key] = v.detach().clone()
    return out


def run(rank: int, mesh, mode: str, root: Path, name: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    import lit_optim

    ckpt, out = str(root / name / "ckpt"), root / name / mode
    out.mkdir(parents=True, exist_ok=True)
    try:
        net = model()
        for layer in (net[0], net[2], net[4]):
            fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)
        opt = lit_optim.build_optimizer(net, name, lr=1e-2, weight_decay=0.1)
        if mode == "straight":
            train(net, opt, range(K), rank)
            msd, osd = get_state_dict(net, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
        else:
            msd, osd = get_state_dict(net, opt)
            sd = {"model": msd, "optim": osd}
            dcp.load(sd, checkpoint_id=ckpt)
            set_state_dict(net, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        torch.save(snapshot(net, opt), out / f"rank{rank}.mid.pt")
        train(net, opt, range(K, 2 * K), rank)
        torch.save(snapshot(net, opt), out / f"rank{rank}.pt")
    except BaseException:  # noqa: BLE001 - recorded for the test to show (DCP raises BaseExceptions)
        (out / f"rank{rank}.err").write_text(traceback.format_exc()[-3000:])
    dist.barrier()


def worker(rank: int, mode: str, root: str, names: list[str]) -> None:
    from gloo_group import end_rank, gloo_mesh

    warnings.filterwarnings("ignore")
    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    if os.environ.get("FSDP2_TORCHAO_CACHE", "lit_optim") == "user":
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(root) / "inductor_shared")
    else:
        os.environ["LIT_OPTIM_COMPILE_CACHE"] = str(Path(root) / "compile_cache")
    with gloo_mesh(rank, WORLD, "29551") as mesh:
        for name in names:
            run(rank, mesh, mode, Path(root), name)
    end_rank()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    torch.multiprocessing.spawn(worker, args=(sys.argv[1], sys.argv[2], sys.argv[3:]), nprocs=WORLD)
