"""Optimizer state dicts made of plain tensors, so a checkpoint loads through every path with no import first.

torchao keeps its 8-bit, 4-bit and FP8 state as tensor subclasses (`OptimState8bit`, ...). Pickled as they are, a
checkpoint holding them
- is refused by ``torch.load(weights_only=True)`` -- the default of torch >= 2.6, and of Lightning's loaders -- in any
  process that has not imported ``torchao.optim`` yet (that import registers the classes as safe globals): a fresh
  ``Trainer.fit(ckpt_path=...)`` reads the checkpoint before the optimizer, hence torchao, is built;
- cannot be loaded with a *callable* ``map_location`` at all, and that is what ``LightningModule.load_from_checkpoint``,
  Lightning's ``TorchCheckpointIO`` and Fabric pass: a callable remaps *storages*, and a wrapper subclass has none of
  its own -- its device is pickled apart, which torch's ``_rebuild_wrapper_subclass`` can remap only with a string,
  device or dict ("Callable map_location not supported with _rebuild_wrapper_subclass").

Every optimizer `build_optimizer` returns therefore writes such a subclass as a marked dict of its inner tensors and
attributes (``__tensor_flatten__``: codes, scale, qmap; signed, shape, dtype) and rebuilds it in ``load_state_dict``
(``__tensor_unflatten__``), through PyTorch's own optimizer hooks. The optimizer object is unchanged; only what
``state_dict()`` returns is plain, so Lightning, Fabric and a hand-written ``torch.save(opt.state_dict())`` all write
checkpoints that any process can read. Checkpoints written before this (holding the subclasses) still load.

Sharded state is left as it is: a DTensor around the subclass (FSDP2) goes through torch.distributed.checkpoint, and
FSDP1's flattened parameters through FSDP's own gathering of tensor state.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from lit_optim.nesting import leaves

MARK = "__lit_optim_tensor_subclass__"
# Only classes from these modules are rebuilt: a checkpoint never makes lit_optim import anything else.
_MODULES = ("torchao.optim.",)


def _portable(t: Any) -> bool:
    cls = type(t)
    return (isinstance(t, torch.Tensor) and cls.__module__.startswith(_MODULES)
            and hasattr(cls, "__tensor_flatten__") and hasattr(cls, "__tensor_unflatten__"))


def flatten(t: torch.Tensor) -> dict[str, Any]:
    names, attrs = t.__tensor_flatten__()
    cls = type(t)
    return {MARK: f"{cls.__module__}:{cls.__qualname__}", "tensors": {n: getattr(t, n) for n in names},
            "attrs": list(attrs), "size": tuple(t.shape), "stride": tuple(t.stride())}


def unflatten(d: dict[str, Any]) -> torch.Tensor:
    module, _, name = d[MARK].partition(":")
    cls = getattr(importlib.import_module(module), name, None) if module.startswith(_MODULES) else None
    if not (isinstance(cls, type) and issubclass(cls, torch.Tensor) and hasattr(cls, "__tensor_unflatten__")):
        raise ValueError(f"The checkpoint names optimizer-state class {d[MARK]!r}; lit_optim rebuilds only torchao's "
                         "(torchao.optim.*). Was it written by another program?")
    return cls.__tensor_unflatten__(d["tensors"], d["attrs"], torch.Size(d["size"]), tuple(d["stride"]))


def _map(value: Any, fn) -> Any:
    """`value` with `fn` applied to every leaf (a marked dict is a leaf); containers are rebuilt only where something
    changed, because the optimizer's live state dicts are inside a fresh state dict."""
    if isinstance(value, dict) and MARK not in value:
        out = {k: _map(v, fn) for k, v in value.items()}
        return value if all(out[k] is value[k] for k in value) else out
    if type(value) in (list, tuple):
        out = [_map(v, fn) for v in value]
        return value if all(a is b for a, b in zip(out, value)) else type(value)(out)
    return fn(value)


def _with_state(state_dict: dict[str, Any], fn) -> dict[str, Any]:
    state = state_dict.get("state") if isinstance(state_dict, dict) else None
    if not isinstance(state, dict):
        return state_dict
    mapped = _map(state, fn)
    return state_dict if mapped is state else {**state_dict, "state": mapped}


def to_plain(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The optimizer state dict with every torchao state subclass as a plain dict (the live state is not touched)."""
    return _with_state(state_dict, lambda v: flatten(v) if _portable(v) else v)


def from_plain(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Undo `to_plain`: marked dicts back into their tensor subclasses; anything else as it was."""
    return _with_state(state_dict, lambda v: unflatten(v) if isinstance(v, dict) and MARK in v else v)


def _fsdp1_sharded(optimizer) -> bool:
    # FSDP1 (Lightning's strategy="fsdp") marks the parameters it flattened, and gathers the shards of every tensor in
    # their state itself (`FSDP.optim_state_dict` calls `state_dict()` first): a plain dict would pass ungathered.
    return any(getattr(p, "_fsdp_flattened", False) for g in optimizer.param_groups for p in g["params"])


def _save_hook(optimizer, state_dict):
    return None if _fsdp1_sharded(optimizer) else to_plain(state_dict)


def _load_hook(optimizer, state_dict):
    return from_plain(state_dict)


def make_portable(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Have `optimizer.state_dict()` return plain tensors and `load_state_dict` take them (see the module docstring).

    The load hook goes on the wrappers' inner optimizers too: GaLore, in-backward and offload hand each saved entry to
    the inner optimizer that owns it, through the inner's own `load_state_dict`.
    """
    for opt in {id(o): o for o in [optimizer, *leaves([optimizer])]}.values():
        if getattr(opt, "_lit_optim_plain_state", False):
            continue
        opt.register_state_dict_post_hook(_save_hook)
        opt.register_load_state_dict_pre_hook(_load_hook, prepend=True)
        opt._lit_optim_plain_state = True
    return optimizer
