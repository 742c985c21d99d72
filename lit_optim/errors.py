"""Errors lit_optim raises before training starts.

Every error names the problem and the fix. They all derive from ``LitOptimError`` (and from ``ValueError`` where the
input is at fault) so callers can catch one type.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LitOptimError(Exception):
    """Base class for every lit_optim configuration error."""


class UnknownOptimizerError(LitOptimError, KeyError):
    def __init__(self, name: str, known: Iterable[str]):
        close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        self.name, self.suggestions = name, close
        super().__init__(
            f"Unknown optimizer {name!r}.{hint} Run `lit-optim list` (or lit_optim.list_optimizers()) for every name."
        )

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class UnsupportedOptimizerError(LitOptimError, ValueError):
    """A name we know (e.g. a Hugging Face one) whose backend lit_optim deliberately does not wrap."""


class BackendNotInstalledError(LitOptimError, ImportError):
    pass


class DeviceRequirementError(LitOptimError, RuntimeError):
    """The optimizer needs CUDA, or a newer GPU, than this machine has."""


class HyperparameterError(LitOptimError, TypeError):
    pass


class IncompatibleConfigError(LitOptimError, ValueError):
    """A combination of settings that is known not to work."""


class MissingPathError(LitOptimError, FileNotFoundError):
    """A path in the config (weights, tokenizer, data) that does not exist or holds nothing usable."""


class OutOfDeviceMemoryError(LitOptimError, RuntimeError):
    """The run did not fit the GPU (or the `max_device_memory_gib` budget); the message says what might."""

    exit_code = 3


class UnwritablePathError(LitOptimError, PermissionError):
    """An output or checkpoint directory the run could not write to (found before step 1, not at the first save)."""


class MixinUsageError(LitOptimError, TypeError):
    """A LightningModule that uses `OptimizerMixin` in a way that would bypass it (base order, its own optimizer)."""
