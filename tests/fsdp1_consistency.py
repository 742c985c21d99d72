"""Run by tests/test_fsdp1.py: two CPU processes (gloo) step a small LightningModule wrapped in FSDP1 as Lightning's
FSDPStrategy wraps it (`FullyShardedDataParallel(module, use_orig_params=True)`, from outside), with each named
optimizer built by the module's own `configure_optimizers` under that strategy, and rank 0 records

- which parameters got another weight decay than their own shape asks for (FSDP1 shows 1-D slices of them),
- how far the gathered parameters are from one process stepping the whole model on the same data, and
- whether the optimizer state survives FSDP1's own optimizer state dict -- the calls Lightning's FSDPStrategy makes
  to save and load a checkpoint, for both of its `state_dict_type`s -- so the next step equals the uninterrupted one.

    python tests/fsdp1_consistency.py OUT.json name [name ...]
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from torch import nn

STEPS, WORLD, BATCH = 6, 2, 16  # six steps: schedule-free RAdam moves nothing in its first few
# SGD keeps state only with momentum. Without it (the default) Lightning's FSDPStrategy cannot load its own full
# checkpoint: the loader reads the first entry of the empty state (an IndexError in Lightning, before lit_optim runs).
OPTIONS = {"sgd": {"momentum": 0.9}}


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(WORLD * BATCH, 64, generator=g) for _ in range(STEPS + 1)]


def optim(name: str) -> dict:
    return {"name": name, "lr": 1e-2, "weight_decay": 0.1, **OPTIONS.get(name, {})}


def build(net: nn.Module, name: str) -> torch.optim.Optimizer:
    """The one-process reference: the optimizer built straight from the model."""
    import lit_optim

    cfg = optim(name)
    return lit_optim.build_optimizer(net, cfg.pop("name"), **cfg)  # schedule-free comes in train mode


def configured(root: nn.Module) -> torch.optim.Optimizer:
    """What Lightning's FSDPStrategy does after wrapping: the LightningModule inside `root` configures its optimizer,
    with the strategy (holding `root` as its model) on its Trainer."""
    from harness import fsdp1_trainer

    root.module._trainer = fsdp1_trainer(root)
    return root.module.configure_optimizers()


def lightning_module(name: str) -> nn.Module:
    import lightning as L

    from lit_optim.mixin import OptimizerMixin

    class Net(OptimizerMixin, L.LightningModule):
        def __init__(self) -> None:
            super().__init__(optim=optim(name))
            self.body = model()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    return Net()


def step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    # The mean over this process's rows; FSDP averages the gradients over ranks = the mean over all rows.
    net(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


def worker(rank: int, out: str, names: list[str]) -> None:
    from gloo_group import end_rank, gloo_mesh, write_results

    warnings.filterwarnings("ignore")
    with gloo_mesh(rank, WORLD, "29541"):
        results = {name: _one(rank, name, Path(out).parent) for name in names}
    write_results(out, rank, results)
    end_rank()


def _full_params(net) -> list[torch.Tensor]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(net):
        return [p.detach().clone() for p in net.parameters()]


def _one(rank: int, name: str, tmp: Path) -> dict:
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    xs = batches()
    try:
        ref = model()
        ref_opt = build(ref, name)
        for x in xs[:STEPS]:
            step(ref, ref_opt, x)
        start = model().parameters()
        result: dict = {"moved": max(float((a - b).abs().max()) for a, b in zip(ref.parameters(), start))}

        net = _wrapped(name)
        opt = configured(net)
        decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
        # Each weight is 2-D (decayed), each bias 1-D (not), whatever slice of it this rank holds.
        result["decay_mismatches"] = [n for n, p in net.module.named_parameters()
                                      if decay[id(p)] != (0.1 if n.endswith("weight") else 0.0)]
        for x in xs[:STEPS]:
            step(net, opt, x[rows])
        result["sharded_vs_one_process"] = [float((a - b).abs().max()) for a, b in zip(_full_params(net),
                                                                                       ref.parameters())]
        for kind, save in SAVE.items():
            save(net, opt, tmp / f"{name}-{kind}", rank)
        step(net, opt, xs[STEPS][rows])  # the uninterrupted run's next step
        after = _full_params(net)
        result["resume"] = {}
        for kind, load in LOAD.items():
            net2 = _wrapped(name)
            opt2 = configured(net2)
            load(net2, opt2, tmp / f"{name}-{kind}")
            step(net2, opt2, xs[STEPS][rows])
            result["resume"][kind] = max(float((a - b).abs().max()) for a, b in zip(_full_params(net2), after))
        return result
    except Exception as err:  # noqa: BLE001 - recorded for the test to show
        return {"error": f"{type(err).__name__}: {err}"[:500]}


def _wrapped(name: str):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP(lightning_module(name), device_id=torch.device("cpu"), use_orig_params=True)


# What Lightning's FSDPStrategy does to save and load a checkpoint, by state_dict_type: "full" gathers everything to
# rank 0 and writes one file (optimizer state keyed by parameter index); "sharded" writes each rank's shards with
# torch.distributed.checkpoint.
def _full_context(net, rank0_only: bool):
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    # Lightning asks FSDP1 to offload both to the host (offload_to_cpu=True), which on a GPU copies them there. This
    # model already is on the host, where that "copy" is no copy: model tensors are freed before they are cloned (a
    # segfault) and every optimizer state of a wrapped module is left a view of one gather buffer reused for the next
    # state (exp_avg returned equal to exp_avg_sq). Without offload FSDP1 clones them instead: the GPU's fresh copies.
    return FSDP.state_dict_type(net, StateDictType.FULL_STATE_DICT, FullStateDictConfig(False, rank0_only),
                                FullOptimStateDictConfig(False, rank0_only))


def _sharded_context(net):
    # Lightning's settings as they are: the sharded path chunks each state into tensors of its own, shared with nothing.
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardedOptimStateDictConfig, ShardedStateDictConfig, StateDictType

    return FSDP.state_dict_type(net, StateDictType.SHARDED_STATE_DICT, ShardedStateDictConfig(True),
                                ShardedOptimStateDictConfig(True))


def _save_full(net, opt, path: Path, rank: int) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import OptimStateKeyType

    with _full_context(net, rank0_only=True):
        model_sd, optim_sd = net.state_dict(), FSDP.optim_state_dict(net, opt)
    if rank == 0:
        optim_sd = FSDP.rekey_optim_state_dict(optim_sd, OptimStateKeyType.PARAM_ID, net)
        torch.save({"state_dict": model_sd, "optimizer": optim_sd}, path)
    dist.barrier()


def _load_full(net, opt, path: Path) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import OptimStateKeyType

    ckpt = torch.load(path, weights_only=True)
    with _full_context(net, rank0_only=False):
        net.load_state_dict(ckpt["state_dict"])
        optim_sd = FSDP.rekey_optim_state_dict(ckpt["optimizer"], OptimStateKeyType.PARAM_NAME, net)
        opt.load_state_dict(FSDP.optim_state_dict_to_load(net, opt, optim_sd))


def _save_sharded(net, opt, path: Path, rank: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with _sharded_context(net):
        dcp.save({"model": net.state_dict(), "optimizer_0": FSDP.optim_state_dict(net, opt)}, checkpoint_id=path)


def _load_sharded(net, opt, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.optimizer import load_sharded_optimizer_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with _sharded_context(net):
        state = {"model": net.state_dict()}
        dcp.load(state, checkpoint_id=path)
        net.load_state_dict(state["model"])
        optim_sd = load_sharded_optimizer_state_dict(model_state_dict=state["model"], optimizer_key="optimizer_0",
                                                     storage_reader=FileSystemReader(path))
        opt.load_state_dict(FSDP.optim_state_dict_to_load(net, opt, optim_sd["optimizer_0"]))


SAVE = {"full": _save_full, "sharded": _save_sharded}
LOAD = {"full": _load_full, "sharded": _load_sharded}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    torch.multiprocessing.spawn(worker, args=(sys.argv[1], sys.argv[2:]), nprocs=WORLD)
