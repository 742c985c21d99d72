"""The registry's state theory applied to one parameter of a built optimizer: which spec's formula serves it.

A name's own theory (`OptimizerSpec.state_bytes`) serves its parameters, except where a composite hands a parameter
to another optimizer: the non-targeted parameters of a GaLore/APOLLO projection cost their inner optimizer's theory,
and bitsandbytes 8-bit keeps the embeddings it was told to keep at 32 bits. The tests check this against the real
storages of built optimizers; `lit_optim.memory_estimate` uses it for models on the meta device.
"""

from __future__ import annotations

from typing import Any

import torch

from lit_optim import theory
from lit_optim.optimizers.in_backward import InBackwardOptimizer
from lit_optim.optimizers.lowrank import LowRankOptimizer
from lit_optim.spec import OptimizerSpec

# Backends whose state tensors take the parameter's dtype (PyTorch's optimizers: bf16 weights, bf16 moments); the
# theories count fp32, the codes of bitsandbytes and torchao are what they are.
STATE_FOLLOWS_PARAM_DTYPE = {"torch"}
FOLLOWS_PARAM_DTYPE_NAMES = {"adam_mini"}  # lit_optim's Adam-mini keeps its first moment like the parameter


def serving_spec(optimizer, p: torch.Tensor) -> tuple[OptimizerSpec, dict[str, Any], OptimizerSpec]:
    """The spec whose theory gives `p`'s state, the hyperparameters to read it with, and the spec of the optimizer
    that keeps the state (the inner one of a projection)."""
    info = optimizer.lit_optim
    hp = dict(info.hyperparameters)
    # In backward, each parameter has its own sub-optimizer (a one-parameter GaLore for a layer-wise name).
    sub = optimizer.optimizer_for(p)[0] if isinstance(optimizer, InBackwardOptimizer) else optimizer
    if not isinstance(sub, LowRankOptimizer):
        return info.spec, hp, info.spec
    inner = sub.inner.spec  # the registry's factory records the spec it builds
    if sub.is_target(p):
        return info.spec, hp, inner
    return inner, {**inner.defaults, **hp}, inner


def expected_state_bytes(optimizer, p: torch.Tensor, *, follow_dtype: bool = True) -> float:
    """Bytes of optimizer state the registry's theory gives parameter `p` of `optimizer` (built by lit_optim).

    `follow_dtype`: scale PyTorch-backend state to the parameter's dtype (the theories count fp32).
    Theories that know the dtype themselves (FlashOptim's) read the element size as ``theory.PARAM_BYTES``.
    """
    spec, hp, keeper = serving_spec(optimizer, p)
    info = optimizer.lit_optim
    if spec.backend == "bitsandbytes" and spec.bits == 8 and info.plan.param_info[id(p)].is_embedding \
            and info.embedding_32bit_params:
        return theory.fp32_states(2)(tuple(p.shape), hp)  # kept at 32 bits, as Hugging Face does
    bytes_ = spec.state_bytes(tuple(p.shape), {**hp, theory.PARAM_BYTES: p.element_size()})
    follows = keeper.backend in STATE_FOLLOWS_PARAM_DTYPE or keeper.name in FOLLOWS_PARAM_DTYPE_NAMES
    if follow_dtype and follows and p.dtype.is_floating_point:
        bytes_ *= p.element_size() / theory.FP32
    return bytes_
