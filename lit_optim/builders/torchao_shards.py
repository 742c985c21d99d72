"""torchao's 8-bit/4-bit Adam under FSDP2: one precision per parameter, decided from the whole parameter.

torchao gives a tensor low-bit state when it has >= 4096 elements divisible by the block size, and asks that of the
*local shard* of a DTensor (pytorch/ao#4912): a (129, 128) weight over 2 ranks is 65 rows (8320 elements, not a
multiple of 256: fp32 state) on rank 0 and 64 rows (8192: 8-bit) on rank 1. `decide_globally` replaces that choice,
for DTensor parameters sharded on dim 0 over a 1-D mesh, with one every rank computes alike from the global shape and
the world size: low-bit when the whole parameter has >= 4096 elements and every rank's shard (torch.chunk of dim 0)
is a non-empty whole number of blocks -- torchao's subclasses can only hold whole blocks -- else fp32 on every rank.
Plain tensors and other placements keep torchao's own choice.

`decide_globally` also keeps the AOTAutograd cache out of the step when the optimizer holds DTensor parameters:
torchao `torch.compile`s its step per parameter, and that cache keys a DTensor by its global metadata only
(DTensor._stable_hash_for_caching: mesh, placements, global shape, stride, dtype) -- not the local shard's shape, nor
the type of the tensor inside (torchao's 8-bit or 4-bit subclass, or plain fp32). Two ranks sharing a cache directory
then loaded graphs compiled for each other's shard sizes (an inductor shape assert), and a process stepping two torchao
optimizers loaded the 8-bit graph for the 4-bit step of a same-shaped parameter. Without that cache AOTAutograd traces
the DTensor step again in each new process, and the FX graph cache, whose key is the traced graph on the local
tensors, still turns inductor's compile into a load.
"""

from __future__ import annotations

import types

import torch

MIN_NUMEL = 4096  # torchao's threshold (after bitsandbytes)


def shard_numels(shape: tuple[int, ...], world: int) -> list[int]:
    """Elements of each rank's shard when dim 0 of `shape` is split as torch.chunk does (FSDP2)."""
    dim0 = shape[0]
    row = 1
    for n in shape[1:]:
        row *= n
    chunk = -(-dim0 // world)
    return [max(0, min(chunk, dim0 - r * chunk)) * row for r in range(world)]


def quantize_globally(shape: tuple[int, ...], world: int, block_size: int) -> bool:
    total = 1
    for n in shape:
        total *= n
    return total >= MIN_NUMEL and all(n > 0 and n % block_size == 0 for n in shard_numels(shape, world))


def _dim0_sharded(p: torch.Tensor) -> bool:
    placements = getattr(p, "placements", None)
    if placements is None or len(placements) != 1 or p.dim() == 0:
        return False
    from torch.distributed.tensor import Shard

    return type(placements[0]) is Shard and placements[0].dim == 0


def _new_buffer(self, p: torch.Tensor, signed: bool):
    if not _dim0_sharded(p):
        return type(self)._new_buffer(self, p, signed)
    from torch.distributed.tensor import DTensor

    local = p.to_local()
    if quantize_globally(tuple(p.shape), p.device_mesh.size(), self.block_size):
        out = self._subclass_zeros(local, signed, self.block_size)
    else:
        out = torch.zeros_like(local)
    # As torchao does: shapes may differ between ranks, so the global shape and stride are given.
    out = DTensor.from_local(out, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    return out.to(p.device)


def _step_without_autograd_cache(self, *args, **kwargs):
    import torch._functorch.config as functorch_config

    with functorch_config.patch(enable_autograd_cache=False):
        return type(self).step(self, *args, **kwargs)


def _holds_dtensors(optimizer: torch.optim.Optimizer) -> bool:
    return any(hasattr(p, "device_mesh") and hasattr(p, "to_local")
               for group in optimizer.param_groups for p in group["params"])


def decide_globally(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Have a torchao low-bit Adam (`_new_buffer` / `_subclass_zeros`) decide precision per parameter, not per shard,
    and (DTensor parameters) step without the AOTAutograd cache, which cannot tell shards or state types apart."""
    if callable(getattr(optimizer, "_new_buffer", None)) and callable(getattr(optimizer, "_subclass_zeros", None)):
        optimizer._new_buffer = types.MethodType(_new_buffer, optimizer)
    if _holds_dtensors(optimizer):
        optimizer.step = types.MethodType(_step_without_autograd_cache, optimizer)
    return optimizer
