"""Real bytes of optimizer state, counted from storages rather than from what tensors claim to be.

torchao keeps state in tensor subclasses whose apparent dtype is fp32 while the data is uint8 codes plus scales;
bitsandbytes shares its quantization maps between parameters and keeps paged state in CUDA managed memory. So: flatten
wrapper subclasses to their inner tensors, and count each underlying storage once.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass


def leaf_tensors(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors that hold `t`'s data (`t` itself unless it is a wrapper subclass)."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from leaf_tensors(getattr(t, name))
    else:
        yield t


def storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (t.device.type, t.untyped_storage().data_ptr())


def state_tensors(value) -> Iterator[torch.Tensor]:
    """Tensors inside one state entry (tensors, or lists/dicts of them, as wrapper optimizers keep)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from state_tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from state_tensors(v)


def state_bytes_by_param(optimizer: torch.optim.Optimizer) -> dict[torch.Tensor, int]:
    """Bytes of state per parameter; a storage shared by several parameters counts for the first one only."""
    seen: set[tuple[str, int]] = set()
    out: dict[torch.Tensor, int] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            total = 0
            for value in optimizer.state.get(p, {}).values():
                for outer in state_tensors(value):
                    for leaf in leaf_tensors(outer):
                        key = storage_key(leaf)
                        if key not in seen:
                            seen.add(key)
                            total += leaf.untyped_storage().nbytes()
            out[p] = total
    return out


def total_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(state_bytes_by_param(optimizer).values())
