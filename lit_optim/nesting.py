"""The nesting protocol's walker: from an optimizer to the plain optimizers that hold state.

A wrapper optimizer (lit_optim's GaLore/APOLLO, in-backward and offload, or a user's) returns the optimizers it
delegates to from ``lit_optim_inner_optimizers()``; `leaves` follows that to the ones that do not delegate. Backend
fix-ups that must reach every real optimizer (bitsandbytes re-paging, quantization-map sharing) walk it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


def leaves(optimizers: Iterable[torch.optim.Optimizer]) -> Iterator[torch.optim.Optimizer]:
    for opt in optimizers:
        if hasattr(opt, "lit_optim_inner_optimizers"):
            yield from leaves(opt.lit_optim_inner_optimizers())
        else:
            yield opt
