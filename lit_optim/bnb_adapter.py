"""bitsandbytes' quirks, handled in one place: override managers, shared quantization maps, re-paging after a resume.

Every bitsandbytes optimizer lit_optim builds, top-level or inside a wrapper, goes through these; the wrappers are
walked with the nesting protocol (`lit_optim.nesting.leaves`).

Override managers: bitsandbytes keeps overrides in one process-wide manager and resolves module overrides into
entries keyed by (group index, param index): once one optimizer has applied an override, the tensor at that position
in every later optimizer of the process gets it too (a Linear weight built later silently kept 32-bit state). So
every bitsandbytes optimizer lit_optim builds -- top-level, or a sub-optimizer of GaLore, in-backward or offload --
gets its own manager: the overrides the user registered globally (``override_config``, ``register_module_override``,
``StableEmbedding``) are carried over, position-keyed entries are not, and `fp32_state_params` keep 32-bit state. A
wrapper whose optimizer steps stand-in tensors (offload's host copies) passes `stand_ins` so the user's overrides
follow them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from lit_optim.nesting import leaves


def is_bnb(optimizer) -> bool:
    return type(optimizer).__module__.startswith("bitsandbytes")


def isolate(optimizer, fp32_state_params: Iterable[torch.Tensor] = ()):
    """`private_override_manager` for a bitsandbytes optimizer, nothing for any other: what every wrapper calls on
    the optimizers it builds, whether from a registry name or from a class the user passed."""
    return private_override_manager(optimizer, fp32_state_params) if is_bnb(optimizer) else None


def private_override_manager(optimizer, fp32_state_params: Iterable[torch.Tensor] = (),
                             stand_ins: Mapping[int, torch.Tensor] | None = None):
    """Give `optimizer` its own override manager (once: later calls add to it) -- see the module docstring."""
    own = getattr(optimizer, "mng", None)
    if not getattr(own, "lit_optim_private", False):
        import bitsandbytes as bnb

        cls = bnb.optim.GlobalOptimManager
        shared = cls.get_instance()
        own = cls.__new__(cls)
        own.initialize()
        own.lit_optim_private = True
        own.pid2config = {pid: dict(config) for pid, config in shared.pid2config.items()}
        own.module_weight_config_triple = list(shared.module_weight_config_triple)
        own.uses_config_override = shared.uses_config_override
        optimizer.mng = own
    if stand_ins:
        # bitsandbytes matches overrides by tensor identity: key the user's by the tensors actually stepped.
        by_param = dict(own.pid2config)
        for module, attr, config in own.module_weight_config_triple:
            by_param.setdefault(id(getattr(module, attr)), config)
        for pid, config in by_param.items():
            if pid in stand_ins:
                own.pid2config[id(stand_ins[pid])] = dict(config)
    for p in fp32_state_params:
        own.pid2config[id(p)] = {**own.pid2config.get(id(p), {}), "optim_bits": 32}
    return own


def share_qmaps(subs: Iterable[torch.optim.Optimizer]) -> None:
    """Let bitsandbytes sub-optimizers share one set of quantization maps (read-only tables), as one optimizer does.

    The sub-optimizers get one ``name2qmap`` dict object, not just equal entries: bitsandbytes moves its maps to the
    parameter's device on the first step by replacing the dict's entries, so one shared dict makes one device copy
    where equal dicts would make one per sub-optimizer. State loaded from a checkpoint holds a copy of the maps per
    parameter, already on the parameter's device: those are replaced by the shared tables, and a shared table still on
    another device is replaced by the loaded copy (bitsandbytes' own move to that device then finds it there).
    """
    quantized = [opt for opt in leaves(subs) if getattr(opt, "name2qmap", None)]
    if not quantized:
        return
    shared = quantized[0].name2qmap
    for opt in quantized:
        maps = opt.name2qmap
        if maps is not shared and maps.keys() == shared.keys() and all(_same(maps[k], shared[k]) for k in maps):
            opt.name2qmap = maps = shared
        for state in opt.state.values():
            for key, value in list(state.items()):
                if not (isinstance(value, torch.Tensor) and key.startswith("qmap")):
                    continue
                for name, table in maps.items():
                    if value is table:
                        break
                    if _same(value, table):
                        if table.device != value.device:
                            maps[name] = value
                        state[key] = maps[name]
                        break


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b.to(a.device))


# bitsandbytes' Optimizer8bit.get_state_buffer pages state only for parameters of at least this many elements.
BNB_PAGED_MIN_NUMEL = 100_000


def repage(optimizer) -> int:
    """Move bitsandbytes state tensors that lost paging (after `load_state_dict`) back into paged buffers.

    Wrappers (in-backward, GaLore) are searched for their paged sub-optimizers."""
    moved = 0
    for leaf in leaves([optimizer]):
        if getattr(leaf, "is_paged", False):
            moved += _repage_one(leaf)
    return moved


def _repage_one(optimizer) -> int:
    moved = 0
    for p, state in optimizer.state.items():
        # bitsandbytes pages all of a parameter's state or none of it, by the *parameter's* size; judging each state
        # tensor by its own size would page AdEMAMix's double-width state1 without its state2, and its prefetch then
        # fails on the unpaged state2.
        if p.numel() < BNB_PAGED_MIN_NUMEL:
            continue
        for key in ("state1", "state2"):
            t = state.get(key)
            if isinstance(t, torch.Tensor) and t.is_cuda and not getattr(t, "is_paged", False):
                fresh = optimizer.get_state_buffer(t, dtype=t.dtype)
                if getattr(fresh, "is_paged", False):
                    fresh.copy_(t)
                    state[key] = fresh
                    moved += 1
    return moved
