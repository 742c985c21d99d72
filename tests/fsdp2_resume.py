"""Run by tests/test_fsdp2_resume.py: CPU processes (gloo) train a small FSDP2-sharded model (`fully_shard`, DTensor
parameters) with a named optimizer built through lit_optim, and checkpoint it with torch.distributed.checkpoint
(DCP: `get_state_dict` / `dcp.save` / `dcp.load` / `set_state_dict`), each rank writing its own shards, and as a
full state dict (`StateDictOptions(full_state_dict=True)`, gathered to rank 0 and `torch.save`d).

    python tests/fsdp2_resume.py straight DIR name [name ...]  # 2 ranks: K steps, save both ways, K more steps
    python tests/fsdp2_resume.py resume   DIR name [name ...]  # 2 ranks, a new model: dcp.load, the same K steps
    python tests/fsdp2_resume.py full     DIR name [name ...]  # 2 ranks, a new model: the full state dict, K steps
    python tests/fsdp2_resume.py reshard  DIR name [name ...]  # 3 ranks: try both loads, keep the errors
    python tests/fsdp2_resume.py straight,resume,full DIR ...  # several modes, one after the other, one process group

The model has a weight whose 65 rows do not split evenly over 2 ranks (33 + 32), biases smaller than a block, and a
one-element gain that leaves rank 1 an empty shard. Each rank saves its local parameter shards, optimizer state
(plain tensors, `torch.save`) and the state monitor's byte count at the checkpoint (DIR/name/MODE/rank{r}.mid.pt:
after the save, or after the load) and at the end (DIR/name/MODE/rank{r}.pt), for the test to compare bit for bit;
an error goes to DIR/name/MODE/rank{r}.err. The straight run also `torch.save`s `optimizer.state_dict()` itself at
the checkpoint (DIR/name/straight/rank{r}.optim_state_dict.pt).
"""

from __future__ import annotations

import sys
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

K, BATCH = 3, 16


class Gain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 65), nn.Tanh(), nn.Linear(65, 64), Gain())


def batch(step: int, rank: int) -> torch.Tensor:
    # Global step `step` gives the same batch whichever run takes it; each of the 2 training ranks takes its rows.
    x = torch.randn(2 * BATCH, 64, generator=torch.Generator().manual_seed(1000 + step))
    return x[rank * BATCH:(rank + 1) * BATCH]


def train(net: nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int) -> None:
    for step in steps:
        net(batch(step, rank)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def snapshot(net: nn.Module, opt: torch.optim.Optimizer) -> dict:
    from lit_optim.state_bytes import state_report

    params = {n: _local(p.detach()).clone() for n, p in net.named_parameters()}
    names = {p: n for n, p in net.named_parameters()}
    state = {f"{names[p]}.{k}": _local(v).detach().clone() for p, s in opt.state.items() for k, v in s.items()
             if torch.is_tensor(v)}
    report = state_report(opt)
    return {"params": params, "state": state, "dtensor": type(net[0].weight).__name__,
            "monitor": {"bytes": report.total.bytes, "params": report.total.params}}


def run(rank: int, mesh, mode: str, root: Path, name: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    import lit_optim

    ckpt, full_ckpt, out = str(root / name / "ckpt"), root / name / "full.pt", root / name / mode
    out.mkdir(parents=True, exist_ok=True)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    try:
        net = model()
        for layer in (net[0], net[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)
        opt = lit_optim.build_optimizer(net, name, lr=1e-2, weight_decay=0.1)
        if mode == "straight":
            train(net, opt, range(K), rank)
            # The optimizer's own state_dict, as a plain torch.save of it holds it (DTensor state for the fused names)
            torch.save(opt.state_dict(), out / f"rank{rank}.optim_state_dict.pt")
            msd, osd = get_state_dict(net, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
            msd, osd = get_state_dict(net, opt, options=full)  # gathered to rank 0 (a collective)
            if rank == 0:
                torch.save({"model": msd, "optim": osd}, full_ckpt)
        elif mode == "reshard":  # 3 ranks: neither checkpoint fits, and each way must say so
            errors = []
            msd, osd = get_state_dict(net, opt)
            sd = {"model": msd, "optim": osd}
            try:
                dcp.load(sd, checkpoint_id=ckpt)
                set_state_dict(net, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
            except BaseException as err:  # noqa: BLE001 - DCP raises CheckpointException, a BaseException
                errors.append(f"{type(err).__name__}: {err}")
            saved = torch.load(full_ckpt, map_location="cpu", weights_only=True)
            try:
                set_state_dict(net, opt, model_state_dict=saved["model"], optim_state_dict=saved["optim"],
                               options=StateDictOptions(full_state_dict=True))
            except BaseException as err:  # noqa: BLE001
                errors.append(f"{type(err).__name__}: {err}")
            torch.save({"errors": errors}, out / f"rank{rank}.errors.pt")
            dist.barrier()
            return
        elif mode == "resume":
            msd, osd = get_state_dict(net, opt)  # a fresh optimizer's state is made here (a step with lr 0)
            sd = {"model": msd, "optim": osd}
            dcp.load(sd, checkpoint_id=ckpt)
            set_state_dict(net, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        else:  # full: every rank reads the whole checkpoint and keeps its own part
            saved = torch.load(full_ckpt, map_location="cpu", weights_only=True)
            set_state_dict(net, opt, model_state_dict=saved["model"], optim_state_dict=saved["optim"],
                           options=StateDictOptions(full_state_dict=True))
        torch.save(snapshot(net, opt), out / f"rank{rank}.mid.pt")
        train(net, opt, range(K, 2 * K), rank)
        torch.save(snapshot(net, opt), out / f"rank{rank}.pt")
    except Exception:  # noqa: BLE001 - recorded for the test to show
        (out / f"rank{rank}.err").write_text(traceback.format_exc()[-3000:])
    dist.barrier()


def worker(rank: int, world: int, modes: str, root: str, names: list[str]) -> None:
    from gloo_group import end_rank, gloo_mesh

    warnings.filterwarnings("ignore")
    with gloo_mesh(rank, world, "29541") as mesh:
        for mode in modes.split(","):
            for name in names:
                run(rank, mesh, mode, Path(root), name)
    end_rank()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    world = 3 if sys.argv[1] == "reshard" else 2
    torch.multiprocessing.spawn(worker, args=(world, sys.argv[1], sys.argv[2], sys.argv[3:]), nprocs=world)
