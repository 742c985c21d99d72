"""Run by tests/test_fsdp2_resume.py: two CPU processes (gloo) train a small FSDP2-sharded model (`fully_shard`,
DTensor parameters) with a named optimizer built through lit_optim, and checkpoint it with torch.distributed.checkpoint
(DCP: `get_state_dict` / `dcp.save` / `dcp.load` / `set_state_dict`), each rank writing its own shards.

    python tests/fsdp2_resume.py straight DIR name [name ...]  # K steps, dcp.save to DIR/name/ckpt, K more steps
    python tests/fsdp2_resume.py resume   DIR name [name ...]  # fresh processes: dcp.load DIR/name/ckpt, the same K

Each rank saves its local parameter shards and optimizer state (plain tensors, `torch.save`) at the checkpoint
(DIR/name/MODE/rank{r}.mid.pt: after the save, or after the load) and at the end (DIR/name/MODE/rank{r}.pt), for the
test to compare bit for bit; an error goes to DIR/name/MODE/rank{r}.err.
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

K, WORLD, BATCH = 3, 2, 16


def model() -> nn.Module:
    torch.manual_seed(0)
    # 64 x 64 weights (32 rows a rank) and 64-element biases (32 a rank), as in tests/fsdp2_consistency.py.
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))


def batch(step: int, rank: int) -> torch.Tensor:
    # Global step `step` gives the same batch whichever run takes it; each rank takes its own rows.
    x = torch.randn(WORLD * BATCH, 64, generator=torch.Generator().manual_seed(1000 + step))
    return x[rank * BATCH:(rank + 1) * BATCH]


def train(net: nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int) -> None:
    for step in steps:
        net(batch(step, rank)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def snapshot(net: nn.Module, opt: torch.optim.Optimizer) -> dict:
    params = {n: _local(p.detach()).clone() for n, p in net.named_parameters()}
    names = {p: n for n, p in net.named_parameters()}
    state = {f"{names[p]}.{k}": _local(v).detach().clone() for p, s in opt.state.items() for k, v in s.items()
             if torch.is_tensor(v)}
    return {"params": params, "state": state, "dtensor": type(net[0].weight).__name__}


def run(rank: int, mesh, mode: str, root: Path, name: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    import lit_optim

    ckpt, out = str(root / name / "ckpt"), root / name / mode
    out.mkdir(parents=True, exist_ok=True)
    try:
        net = model()
        for layer in (net[0], net[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)
        opt = lit_optim.build_optimizer(net, name, lr=1e-2, weight_decay=0.1)
        if mode == "straight":
            train(net, opt, range(K), rank)
            msd, osd = get_state_dict(net, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
        else:
            msd, osd = get_state_dict(net, opt)  # a fresh optimizer's state is made here (a step with lr 0)
            sd = {"model": msd, "optim": osd}
            dcp.load(sd, checkpoint_id=ckpt)
            set_state_dict(net, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        torch.save(snapshot(net, opt), out / f"rank{rank}.mid.pt")
        train(net, opt, range(K, 2 * K), rank)
        torch.save(snapshot(net, opt), out / f"rank{rank}.pt")
    except Exception:  # noqa: BLE001 - recorded for the test to show
        (out / f"rank{rank}.err").write_text(traceback.format_exc()[-3000:])
    dist.barrier()


def worker(rank: int, mode: str, root: str, names: list[str]) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("FSDP2_TEST_PORT", "29541"))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        for name in names:
            run(rank, mesh, mode, Path(root), name)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    torch.multiprocessing.spawn(worker, args=(sys.argv[1], sys.argv[2], sys.argv[3:]), nprocs=WORLD)
