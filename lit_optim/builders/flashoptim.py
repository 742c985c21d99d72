"""FlashOptim's optimizers from a registry name (``flash_adamw`` ...): the request fitted to the model, and the built
object checked against it.

FlashOptim steps each parameter in one Triton kernel that reads and rewrites its moments as 8-bit codes (one fp16
scale per 32 values) and, for a bf16/fp16 parameter, an integer tensor of error-correction bits holding the precision
the 16-bit weight drops: ``master_weight_bits=24`` keeps one byte per element (int8), 32 keeps two (int16). Settled
here, before any kernel runs:

- ``master_weight_bits`` (24, 32 or null) is the precision of the weights being updated. An fp32 parameter has 32 bits
  already and gets no correction bits, and flashoptim refuses 24/32 when *every* parameter is fp32: such a model is
  built with null, the same step, so one config serves fp32 and bf16-true runs alike;
- every parameter must live on a CUDA device (the step is Triton only); parameters on the host are refused when the
  optimizer is built rather than inside the first kernel launch;
- each group's ``initial_lr`` is that group's own learning rate: flashoptim gives every group the base rate, with which
  an LR schedule (and ``decouple_lr``) would drop lit_optim's ``lr_scales``.

The class's arguments are declared here (flashoptim 0.1.4's constructors) rather than read from the class, so the
Hydra configs and ``lit-optim describe`` need no flashoptim (nor triton) where it is not installed;
tests/test_flashoptim.py compares them with the installed classes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lit_optim.errors import DeviceRequirementError, HyperparameterError, IncompatibleConfigError
from lit_optim.spec import OptimizerSpec

MASTER_WEIGHT_BITS = (None, 24, 32)
DEFAULT_MASTER_WEIGHT_BITS = 24
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MASTER_BYTES = {None: 0, 24: 3, 32: 4}  # what flashoptim keeps per group as ``master_bytewidth``

# Constructor arguments after ``params``, with flashoptim's defaults -- except ``master_weight_bits``, listed as None so
# that null passes the type check (`build` checks its value; a name's default, 24, is in the spec's `defaults`).
_SWITCHES = {"quantize": True, "compress_state_dict": True, "master_weight_bits": None, "check_numerics": False,
             "fused": True}
_ADAM = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}
_SGD = {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False}
ARGUMENTS: Mapping[str, Mapping[str, Any]] = {
    "FlashAdamW": {**_ADAM, "weight_decay": 1e-2, "decouple_lr": False, **_SWITCHES},
    "FlashAdam": {**_ADAM, "weight_decay": 0.0, **_SWITCHES},
    "FlashLion": {"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0, "decouple_lr": False, **_SWITCHES},
    "FlashSGD": {**_SGD, **_SWITCHES},
    "FlashSGDW": {**_SGD, "decouple_lr": False, **_SWITCHES},
}


def arguments(spec: OptimizerSpec) -> dict[str, Any]:
    """The hyperparameters a FlashOptim name takes (its class's constructor arguments), without importing it."""
    return dict(ARGUMENTS[spec.target.partition(":")[2]])


def master_bits_for(bits: int | None, params: list[torch.Tensor]) -> int | None:
    """What flashoptim is given for ``master_weight_bits``: `bits`, or None when no parameter is narrower than fp32
    (nothing to correct; flashoptim refuses 24/32 there)."""
    if bits is None or all(p.dtype == torch.float32 for p in params):
        return None
    return int(bits)


def _requested_bits(spec: OptimizerSpec, kwargs: Mapping[str, Any]) -> int | None:
    bits = kwargs.get("master_weight_bits", DEFAULT_MASTER_WEIGHT_BITS)
    if isinstance(bits, bool) or bits not in MASTER_WEIGHT_BITS:
        raise HyperparameterError(
            f"Optimizer {spec.name!r}: master_weight_bits={bits!r} must be 24, 32 or null (24/32: error-correction "
            "bits give bf16/fp16 weights that precision; null: they are updated in their own)."
        )
    return None if bits is None else int(bits)


def _check_params(spec: OptimizerSpec, params: list[torch.Tensor]) -> None:
    where = sorted({p.device.type for p in params} - {"cuda", "meta"})  # meta: `lit-optim estimate` builds on it
    if where:
        raise DeviceRequirementError(
            f"Optimizer {spec.name!r} steps with CUDA (Triton) kernels, but parameters of this model are on "
            f"{', '.join(where)}. Move the model to the GPU before building the optimizer (Lightning does so with "
            "accelerator='gpu')."
        )
    odd = sorted({str(p.dtype).removeprefix("torch.") for p in params if p.dtype not in PARAM_DTYPES})
    if odd:
        raise IncompatibleConfigError(
            f"Optimizer {spec.name!r} steps fp32, bf16 and fp16 parameters; this model has {', '.join(odd)} ones. "
            "Cast the model (e.g. precision='bf16-true'), or pick another optimizer."
        )


def build(groups: list[dict], spec: OptimizerSpec, kwargs: Mapping[str, Any], context=None) -> torch.optim.Optimizer:
    """`spec`'s FlashOptim class over `groups` (see the module docstring for what is settled first)."""
    params = [p for g in groups for p in g["params"]]
    bits = _requested_bits(spec, kwargs)
    if isinstance(kwargs.get("lr"), torch.Tensor):
        raise HyperparameterError(f"Optimizer {spec.name!r} takes lr as a number (its kernels read it as one), not a "
                                  "tensor.")
    _check_params(spec, params)
    optimizer = spec.load_class()(groups, **{**kwargs, "master_weight_bits": master_bits_for(bits, params)})
    for group in optimizer.param_groups:
        group["initial_lr"] = float(group["lr"])
    return optimizer


def check_built(optimizer: torch.optim.Optimizer, spec: OptimizerSpec, ctor: Mapping[str, Any]) -> None:
    """The FlashOptim object does what was asked: quantized moments or not, and the master-weight bytes, per group
    (what its step reads), plus the fused kernel and compressed checkpoints."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    quantize = bool(ctor.get("quantize", True))
    bits = master_bits_for(ctor.get("master_weight_bits", DEFAULT_MASTER_WEIGHT_BITS), params)
    want = (quantize, _MASTER_BYTES[bits])
    got = sorted({(g.get("quantize"), g.get("master_bytewidth")) for g in optimizer.param_groups}, key=str)
    if got != [want]:
        raise AssertionError(
            f"{spec.name!r} built flashoptim {type(optimizer).__name__} with (quantize, master bytes) per group {got}; "
            f"expected quantize={quantize}, master_weight_bits={bits} ({want[1]} bytes)"
        )
    for key, attr in (("fused", "_fused"), ("compress_state_dict", "_compress_state_dict")):
        have = getattr(optimizer, attr, None)
        if have is not None and have != bool(ctor.get(key, True)):
            raise AssertionError(f"{spec.name!r} built flashoptim {type(optimizer).__name__} with {key}={have}; "
                                 f"expected {bool(ctor.get(key, True))}")
