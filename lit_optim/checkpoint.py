"""Checkpoint loading that works for every optimizer in the registry.

Lightning's `TorchCheckpointIO` loads with a *callable* `map_location`, which torchao's state subclasses refuse
("Callable map_location not supported with _rebuild_wrapper_subclass"). Loading to CPU first is equivalent for
training -- the model and optimizer `load_state_dict` move every tensor to its parameter's device -- and works for all.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO


class LitOptimCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` that loads to CPU (plain device string), so torchao optimizer state can resume."""

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if callable(map_location) or map_location is None:
            map_location = "cpu"
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def install_checkpoint_io(trainer) -> bool:
    """Swap the strategy's plain `TorchCheckpointIO` for ours; leave custom (e.g. async, FSDP) IO alone."""
    strategy = trainer.strategy
    current = getattr(strategy, "checkpoint_io", None)
    if type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = LitOptimCheckpointIO()
        return True
    return isinstance(current, LitOptimCheckpointIO)
