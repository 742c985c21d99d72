"""Muon for 2-D hidden weights and AdamW for everything else, as one optimizer Lightning can step and checkpoint.

Muon orthogonalises the update of a weight matrix, which is meaningless for embeddings, the output head and 1-D
parameters; those take AdamW. Both halves are PyTorch's own optimizers: this class only owns the param groups and the
state and lends them to the two of them, so `state_dict()` is one ordinary optimizer state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

MUON, ADAMW = "muon", "adamw"


class MuonWithAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr_fn: str = "match_rms_adamw",
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        param_info: Mapping[int, Any] | None = None,
    ) -> None:
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        muon_groups, adamw_groups = [], []
        for group in groups:
            ps = list(group["params"])
            is_muon = [self._wants_muon(p, param_info) for p in ps]
            base = {k: v for k, v in group.items() if k != "params"}
            name = base.pop("name", "params")
            if any(is_muon):
                muon_groups.append({**base, "params": [p for p, m in zip(ps, is_muon) if m], "name": f"{name}/{MUON}"})
            if not all(is_muon):
                adamw_groups.append({**base, "params": [p for p, m in zip(ps, is_muon) if not m],
                                     "name": f"{name}/{ADAMW}"})
        self._muon = torch.optim.Muon(
            muon_groups or [{"params": []}], lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
            ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
        ) if muon_groups else None
        self._adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay) \
            if adamw_groups else None
        for opt, kind in ((self._muon, MUON), (self._adamw, ADAMW)):
            for g in opt.param_groups if opt else ():
                g["kind"] = kind
        inner_groups = [*(self._muon.param_groups if self._muon else ()),
                        *(self._adamw.param_groups if self._adamw else ())]
        # The same dict objects: schedulers and Lightning edit the groups the inner optimizers read.
        super().__init__(inner_groups, {"lr": lr})
        self._relink()
        self.register_load_state_dict_post_hook(lambda opt: opt._relink())

    @staticmethod
    def _wants_muon(p: torch.Tensor, info: Mapping[int, Any] | None) -> bool:
        if p.ndim != 2:
            return False
        meta = (info or {}).get(id(p))
        return not (meta is not None and (meta.is_embedding or meta.is_head))

    def _relink(self) -> None:
        for opt, kind in ((self._muon, MUON), (self._adamw, ADAMW)):
            if opt is not None:
                opt.param_groups = [g for g in self.param_groups if g["kind"] == kind]
                opt.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in (self._muon, self._adamw):
            if opt is not None:
                opt.step()
        return loss
