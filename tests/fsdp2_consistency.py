"""Run by tests/test_fsdp2_lowbit.py: two CPU processes (gloo) step a small FSDP2-sharded model (`fully_shard`, DTensor
parameters) with each named optimizer, and rank 0 records how far the gathered parameters are from one process
stepping the whole model with the same optimizer on the same data.

    python tests/fsdp2_consistency.py OUT.json name [name ...]
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from torch import nn

STEPS, WORLD, BATCH = 3, 2, 16


def model() -> nn.Module:
    torch.manual_seed(0)
    # 64 x 64 weights: a rank's shard (32 rows) is 2048 elements, whole blocks of 256, so per-shard quantization
    # should give what quantizing the whole tensor gives.
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(WORLD * BATCH, 64, generator=g) for _ in range(STEPS)]


def train(net: nn.Module, name: str, rows: slice, grads_from: nn.Module | None = None) -> torch.optim.Optimizer:
    """`STEPS` steps on `rows` of each batch. With `grads_from` (an unsharded twin), each sharded gradient is replaced
    by the matching shard of the twin's full-batch gradient: then only the optimizer differs from one process."""
    from torch.distributed.tensor import distribute_tensor

    import lit_optim

    opt = lit_optim.build_optimizer(net, name, lr=1e-2, weight_decay=0.1)
    for x in batches():
        # The mean over this rank's rows; FSDP2 averages the gradients over ranks = the mean over all rows.
        net(x[rows]).square().mean().backward()
        if grads_from is not None:
            grads_from.zero_grad()
            for p, q in zip(grads_from.parameters(), net.parameters()):
                p.data.copy_(q.full_tensor())
            grads_from(x).square().mean().backward()
            for p, q in zip(grads_from.parameters(), net.parameters()):
                q.grad = distribute_tensor(p.grad, q.device_mesh, q.placements)
        opt.step()
        opt.zero_grad()
    return opt


def worker(rank: int, out: str, names: list[str]) -> None:
    from gloo_group import end_rank, gloo_mesh, write_results

    warnings.filterwarnings("ignore")
    with gloo_mesh(rank, WORLD, "29531") as mesh:
        results = _results(rank, mesh, names)
    write_results(out, rank, results)
    end_rank()


def _results(rank: int, mesh, names: list[str]) -> dict:
    from torch.distributed.fsdp import fully_shard

    results = {}
    for name in names:
        try:
            ref = model()
            train(ref, name, slice(None))
            results[name] = {"moved": max(float((a - b).abs().max()) for a, b in zip(ref.parameters(),
                                                                                    model().parameters()))}
            for mode in ("backward", "same_grads"):
                net = model()
                for layer in (net[0], net[2]):
                    fully_shard(layer, mesh=mesh)
                fully_shard(net, mesh=mesh)
                opt = train(net, name, slice(rank * BATCH, (rank + 1) * BATCH),
                            grads_from=model() if mode == "same_grads" else None)
                sharded = [p.full_tensor() for p in net.parameters()]
                results[name][mode] = [float((a - b).abs().max()) for a, b in zip(sharded, ref.parameters())]
            results[name]["state_shapes"] = {k: tuple(v.shape) for k, v in opt.state[net[0].weight].items()
                                             if torch.is_tensor(v)}
            results[name]["dtensor"] = type(net[0].weight).__name__
        except Exception as err:  # noqa: BLE001 - recorded for the test to show
            results[name] = {"error": f"{type(err).__name__}: {err}"[:500]}
    return results


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    torch.multiprocessing.spawn(worker, args=(sys.argv[1], sys.argv[2:]), nprocs=WORLD)
