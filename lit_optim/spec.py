"""`OptimizerSpec`: one frozen, declarative record per registry name.

A spec says what a name builds (`target` class plus the arguments the name fixes, such as bits or paging), what its
optimizer state costs in theory (`state_bytes`), where it runs and what it supports. Specs never import their backend;
`lit_optim/builders/` does that when the name is actually built.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

# What a training setup may need from an optimizer; `supports` lists the ones a spec handles. FSDP1 is Lightning's
# FSDPStrategy (`strategy="fsdp"`): it shows the optimizer 1-D slices of flattened parameters and gathers only state
# shaped like them, so only elementwise updates with parameter-shaped state qualify. FSDP2 is ModelParallelStrategy
# with `fully_shard`: DTensor parameters, sharded by rows.
CPU, DDP, FSDP1, FSDP2, GRAD_CLIP, GRAD_ACCUM = "cpu", "ddp", "fsdp1", "fsdp2", "grad_clip", "grad_accum"
ALL_FEATURES = frozenset({CPU, DDP, FSDP1, FSDP2, GRAD_CLIP, GRAD_ACCUM})
# How error messages name the way to FSDP2: lit_optim's ModelParallelStrategy with every device in the sharded mesh.
FSDP2_FIX = "trainer=fsdp2, i.e. lit_optim.task.fsdp2.FSDP2Strategy"

# backend -> (module to import, how to install it)
BACKENDS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "torch": ("torch", "pip install torch"),
        "torchao": ("torchao", "pip install torchao"),
        "bitsandbytes": ("bitsandbytes", "pip install bitsandbytes"),
        "schedulefree": ("schedulefree", "pip install 'lit-optim[schedulefree]'  (or: pip install schedulefree)"),
        "optimi": ("optimi", "pip install 'lit-optim[optimi]'  (or: pip install torch-optimi)"),
        "flashoptim": ("flashoptim", "pip install 'lit-optim[flashoptim]'  (or: pip install flashoptim)"),
        "lit_optim": ("lit_optim", "pip install lit-optim"),
    }
)

# state_bytes(shape, hyperparameters) -> bytes of optimizer state kept for one parameter tensor of that shape.
StateTheory = Callable[[tuple[int, ...], Mapping[str, Any]], float]
# builder(param_groups, spec, kwargs, context) -> optimizer, for names that are more than `target(**kwargs)`.
Builder = Callable[..., Any]
# arguments(spec) -> {hyperparameter: default}, for names that take more than their class's constructor arguments.
Arguments = Callable[["OptimizerSpec"], Mapping[str, Any]]


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    backend: str
    target: str  # "package.module:Class", imported only when built
    description: str
    state_bytes: StateTheory
    aliases: tuple[str, ...] = ()
    fixed: Mapping[str, Any] = field(default_factory=dict)  # arguments the name itself implies (bits, paging, fused)
    defaults: Mapping[str, Any] = field(default_factory=dict)  # our defaults where the class's are unsuitable
    bits: int | None = 32  # precision of the bulk of the state (None: the optimizer keeps no state)
    paged: bool = False
    requires_cuda: bool = False
    min_compute_capability: tuple[int, int] | None = None
    supports: frozenset[str] = ALL_FEATURES
    builder: Builder | None = None
    arguments: Arguments | None = None
    train_eval_switch: bool = False  # schedule-free: optimizer.train()/eval() must follow the module
    embedding_state_32bit: bool = False  # bnb 8-bit: nn.Embedding weights keep 32-bit state by default
    notes: str = ""
    # Why a feature left out of `supports` is left out ({feature: one clause}); the Trainer check and the README's
    # support matrix both say it, so the refusal and the documentation cannot disagree.
    unsupported_why: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"spec {self.name!r}: unknown backend {self.backend!r}")
        object.__setattr__(self, "fixed", _frozen(self.fixed))
        object.__setattr__(self, "defaults", _frozen(self.defaults))
        object.__setattr__(self, "supports", frozenset(self.supports))
        object.__setattr__(self, "unsupported_why", _frozen(self.unsupported_why))

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    @property
    def install_hint(self) -> str:
        return BACKENDS[self.backend][1]

    @property
    def backend_module(self) -> str:
        return BACKENDS[self.backend][0]

    def load_class(self) -> type:
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)

    def bytes_per_param(self, hyperparameters: Mapping[str, Any] | None = None) -> float:
        """State bytes per parameter of a large 4096 x 4096 weight (where low-bit quantization applies)."""
        shape = (4096, 4096)
        return self.state_bytes(shape, {**self.defaults, **(hyperparameters or {})}) / (4096 * 4096)


def constructor_arguments(cls: type, plumbing: tuple[str, ...] = ()) -> dict[str, Any]:
    """The hyperparameters a class's constructor takes, with their defaults (``inspect.Parameter.empty`` if required).

    The one scan every optimizer class goes through: ``self``, ``params`` and ``*args``/``**kwargs`` are never
    hyperparameters, and `plumbing` names the arguments the builder supplies itself (targets, partitions,
    factories), which a user does not set.
    """
    skip = {"self", "params", *plumbing}
    return {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()
            if n not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
