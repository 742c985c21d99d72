"""One private bitsandbytes override manager per optimizer, carrying the user's own overrides.

bitsandbytes keeps overrides in one process-wide manager and resolves module overrides into entries keyed by (group
index, param index): once one optimizer has applied an override, the tensor at that position in every later optimizer
of the process gets it too (a Linear weight built later silently kept 32-bit state). So every bitsandbytes optimizer
lit_optim builds -- top-level, or a sub-optimizer of GaLore, in-backward or offload -- gets its own manager: the
overrides the user registered globally (``override_config``, ``register_module_override``, ``StableEmbedding``) are
carried over, position-keyed entries are not, and `fp32_state_params` keep 32-bit state. A wrapper whose optimizer
steps stand-in tensors (offload's host copies) passes `stand_ins` so the user's overrides follow them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


def private_override_manager(optimizer, fp32_state_params: Iterable[torch.Tensor] = (),
                             stand_ins: Mapping[int, torch.Tensor] | None = None):
    import bitsandbytes as bnb

    cls = bnb.optim.GlobalOptimManager
    shared = cls.get_instance()
    own = cls.__new__(cls)
    own.initialize()
    own.pid2config = {pid: dict(config) for pid, config in shared.pid2config.items()}
    own.module_weight_config_triple = list(shared.module_weight_config_triple)
    own.uses_config_override = shared.uses_config_override
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
    optimizer.mng = own
    return own
