"""Optimizers made of other optimizers, seen from outside as one ordinary optimizer.

GaLore and APOLLO step an inner optimizer on low-rank stand-ins of the weights; optimizer-in-backward steps one
optimizer per parameter. Lightning, the LR schedulers, the checkpoint and the state-bytes callbacks must still see one
optimizer whose ``param_groups`` hold the model's parameters and whose ``state[p]`` is the real state of ``p``.

`CompositeOptimizer` provides that. Each real parameter is *routed* to (sub-optimizer, key tensor): the key is the
parameter itself, or the stand-in the sub-optimizer steps instead. ``self.state[p]`` is the very dict the sub-optimizer
keeps for its key, so in-place edits (Lightning moving state to a device) reach the state that is used. Keys the
composite adds itself (projector state) start with ``own_prefix`` and live in the same dict. ``state_dict()`` is
PyTorch's (it packs ``self.state`` by parameter index); ``load_state_dict`` hands each entry back to the sub-optimizer
that owns it, so each backend casts and places its own state the way it always does (bitsandbytes' uint8 codes,
torchao's quantized subclasses), and then re-links.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from itertools import chain
from typing import Any

import torch

from lit_optim.errors import HyperparameterError
from lit_optim.state_bytes import state_entries


def as_groups(params) -> list[dict]:
    groups = list(params)
    if not groups:
        raise HyperparameterError("The optimizer got no parameters.")
    if not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    return [{**g, "params": list(g["params"])} for g in groups]


def set_group_value(group: dict, key: str, value: Any) -> None:
    """Write a hyperparameter into a sub-optimizer's group; torchao keeps ``lr`` as a tensor that must be filled."""
    current = group.get(key)
    if isinstance(current, torch.Tensor):
        current.fill_(float(value))
    else:
        group[key] = value


class CompositeOptimizer(torch.optim.Optimizer):
    """Base for optimizers that delegate each parameter's state to a sub-optimizer (see the module docstring)."""

    own_prefix = "proj_"

    # --- subclasses implement -------------------------------------------------------------------------------------
    def _route(self, p: torch.Tensor) -> tuple[torch.optim.Optimizer, torch.Tensor]:
        raise NotImplementedError

    def lit_optim_inner_optimizers(self) -> list[torch.optim.Optimizer]:
        """The nesting protocol (see README): the optimizers this one delegates to. Re-paging and quantization-map
        sharing walk it to the leaves; state accounting uses `lit_optim_state_tensors` instead, which attributes
        each state tensor to the model parameter it serves (GaLore's inner optimizers step stand-in tensors)."""
        raise NotImplementedError

    def optimizer_for(self, p: torch.Tensor) -> tuple[torch.optim.Optimizer, torch.Tensor]:
        """The optimizer that steps model parameter `p`, and the tensor it steps (`p`, or a low-rank stand-in)."""
        return self._route(p)

    def settings_for(self, p: torch.Tensor) -> dict[str, Any]:
        """The hyperparameters `p` is stepped with: its group's in the optimizer that steps it."""
        sub, key = self._route(p)
        for group in sub.param_groups:
            if any(t is key for t in group["params"]):
                return {k: v for k, v in group.items() if k != "params"}
        raise KeyError(f"{type(self).__name__}: the tensor is not one of this optimizer's parameters")

    def lit_optim_state_tensors(self):
        """The nesting protocol's accounting half: ``(param, key, tensor)`` for the state of each model parameter."""
        yield from state_entries(self.state)

    def _after_load(self) -> None:
        """Hook for subclasses (re-share tables, re-sync groups)."""

    # --- state routing ---------------------------------------------------------------------------------------------
    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _link(self, p: torch.Tensor, own: Mapping[str, Any] | None = None) -> dict | None:
        """Make ``self.state[p]`` the sub-optimizer's dict for p's key (adding `own` entries); None if it has none."""
        sub, key = self._route(p)
        state = sub.state.get(key)
        if state is None and own:
            state = sub.state[key]
        if state is None:
            return None
        if own:
            state.update(own)
        if self.state.get(p) is not state:
            self.state[p] = state
        return state

    def _own_state(self, p: torch.Tensor, pending: dict) -> dict:
        """Where the composite's own entries for p live: the linked dict, or `pending` until the sub has state."""
        state = self.state.get(p)
        return state if state is not None else pending.setdefault(p, {})

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        groups, saved_groups = self.param_groups, state_dict["param_groups"]
        if len(groups) != len(saved_groups) or any(
            len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)
        ):
            raise ValueError(
                f"{type(self).__name__}: the saved optimizer state has different param groups "
                f"({[len(s['params']) for s in saved_groups]} params) than this optimizer "
                f"({[len(g['params']) for g in groups]}); was the model or the optimizer configuration changed?"
            )
        for group, saved in zip(groups, saved_groups):
            for key, value in saved.items():
                if key != "params":
                    group[key] = value
        id_map = dict(zip(chain.from_iterable(s["params"] for s in saved_groups), self._params()))
        per_sub: dict[int, tuple[torch.optim.Optimizer, dict]] = {}
        own: dict[torch.Tensor, dict] = {}
        for saved_id, entry in state_dict["state"].items():
            p = id_map[saved_id]
            sub, key = self._route(p)
            mine = {k: v for k, v in entry.items() if isinstance(k, str) and k.startswith(self.own_prefix)}
            theirs = {k: v for k, v in entry.items() if k not in mine}
            own[p] = {k: v.to(p.device) if isinstance(v, torch.Tensor) else v for k, v in mine.items()}
            if theirs:
                per_sub.setdefault(id(sub), (sub, {}))[1][key] = theirs
        for sub in self.lit_optim_inner_optimizers():
            entries = per_sub.get(id(sub), (sub, {}))[1]
            _load_partial(sub, entries)
        self.state = defaultdict(dict)
        for p in self._params():
            self._link(p, own.get(p))
        self._after_load()


def _load_partial(sub: torch.optim.Optimizer, entries: Mapping[torch.Tensor, dict]) -> None:
    """Load `entries` (key tensor -> state) into `sub` through its own `load_state_dict` (its dtype/device policy)."""
    index = {id(t): i for i, t in enumerate(chain.from_iterable(g["params"] for g in sub.param_groups))}
    current = sub.state_dict()
    sub.load_state_dict({
        "state": {index[id(k)]: dict(v) for k, v in entries.items()},
        "param_groups": current["param_groups"],
    })
