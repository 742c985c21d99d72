"""FlashOptim (Databricks' ``flashoptim``): each step one fused Triton kernel per parameter, moments as companded 8-bit
codes, and error-correction bits that give bf16/fp16 weights 24- or 32-bit master precision. CUDA only.

Its options are hyperparameters of every name: ``quantize`` (8-bit moments with an fp16 scale per 32 values; false
keeps them in the parameter's dtype), ``master_weight_bits`` (24, 32 or null), ``compress_state_dict`` (checkpoints
hold the codes; false writes fp32 moments), ``check_numerics`` (refuse a learning rate too small to move the weights).
`lit_optim.builders.flashoptim` fits them to the model and checks the built object against them.
"""

from __future__ import annotations

from lit_optim import theory
from lit_optim.builders.flashoptim import DEFAULT_MASTER_WEIGHT_BITS, arguments, build
from lit_optim.spec import DDP, FSDP1, FSDP2, GRAD_ACCUM, GRAD_CLIP, OptimizerSpec

SPECS: list[OptimizerSpec] = []  # in registry order; lit_optim/specs/all.py collects them
register = SPECS.append

# DDP hands every rank the same averaged gradients; clipping and accumulation work on ordinary .grad tensors before
# step(). FSDP is not claimed: flashoptim has no FSDP1 support, and it steps FSDP2 shards (checkpoints through DCP,
# evenly sharded parameters only) but no multi-GPU machine has run that here yet.
_SUPPORTS = frozenset({DDP, GRAD_CLIP, GRAD_ACCUM})
_WHY = {FSDP1: "flashoptim does not support FSDP1",
        FSDP2: "its FSDP2 path has not been run on several GPUs here yet"}
# Triton, which compiles the step, supports NVIDIA GPUs of compute capability 8.0 (Ampere) and newer.
_CAPABILITY = (8, 0)
_DEFAULTS = {"quantize": True, "master_weight_bits": DEFAULT_MASTER_WEIGHT_BITS}
_NOTE = ("Every tensor's moments are 8-bit whatever its size. bf16/fp16 parameters add 1 byte/param of "
         "error-correction bits (master_weight_bits=24) or 2 (32), counted as optimizer state; fp32 parameters need "
         "none (an all-fp32 model is built with master_weight_bits=null). Checkpoints hold the codes and load with "
         "weights_only=True. Not FSDP: flashoptim has no FSDP1 support, and its FSDP2 path has not been run here.")


def _flash(name: str, cls: str, state_bytes, desc: str, defaults=None, notes: str = "") -> None:
    register(OptimizerSpec(
        name=name, backend="flashoptim", target=f"flashoptim:{cls}", bits=8, state_bytes=state_bytes,
        requires_cuda=True, min_compute_capability=_CAPABILITY, supports=_SUPPORTS, builder=build, arguments=arguments,
        unsupported_why=_WHY,
        defaults={**_DEFAULTS, **(defaults or {})}, notes=" ".join(filter(None, (notes, _NOTE))),
        description=f"FlashOptim {cls}: {desc}, fused Triton step; 24-bit master weights for bf16 params.",
    ))


_flash("flash_adamw", "FlashAdamW", theory.flash_states(2), "8-bit AdamW moments (decoupled weight decay)")
_flash("flash_adam", "FlashAdam", theory.flash_states(2), "8-bit Adam moments (L2 weight decay)")
_flash("flash_lion", "FlashLion", theory.flash_states(1), "8-bit Lion momentum")
# flashoptim's SGD defaults to no momentum, which leaves nothing to quantize: the names default to the usual 0.9.
_SGD_NOTE = "momentum defaults to 0.9 (flashoptim's own default, 0, keeps no state)."
_flash("flash_sgd", "FlashSGD", theory.flash_states(1, only_with_momentum=True),
       "SGD with an 8-bit momentum buffer (L2 weight decay)", defaults={"momentum": 0.9}, notes=_SGD_NOTE)
_flash("flash_sgdw", "FlashSGDW", theory.flash_states(1, only_with_momentum=True),
       "SGD with an 8-bit momentum buffer (decoupled weight decay)", defaults={"momentum": 0.9}, notes=_SGD_NOTE)
