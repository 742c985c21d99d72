"""Schedule-free optimizers' train/eval switch, made safe for torch.distributed.checkpoint.

`optimizer.train()` and `.eval()` of the schedulefree package look up ``optimizer.state[p]`` for every parameter, and
that (a defaultdict) leaves an empty entry for each parameter that has no state yet. DCP's `get_state_dict` builds a
fresh optimizer's state with one step at lr 0, but only when ``optimizer.state`` is empty: with those entries it skips
that step, a sharded load (Lightning's ModelParallelStrategy, trainer=fsdp2) has nothing to load into and the resumed
run silently starts from empty moments, and a full-state-dict load stops ("Expected device to be set"). The step at
lr 0 itself needs train mode: a new schedule-free optimizer is in eval mode and refuses it.
"""

from __future__ import annotations

import torch


def switch_mode(optimizer: torch.optim.Optimizer, train: bool) -> None:
    """`optimizer.train()` (or `.eval()`), without the empty state entries the switch leaves behind."""
    optimizer.train() if train else optimizer.eval()
    drop_empty_state(optimizer)


def drop_empty_state(optimizer: torch.optim.Optimizer) -> None:
    for p in [p for p, s in optimizer.state.items() if not s]:
        del optimizer.state[p]
