"""torchao's low-bit AdamW/Adam: 8-bit and 4-bit block-quantized state, FP8 state (CUDA >= 8.9)."""

from __future__ import annotations

from lit_optim import theory
from lit_optim.spec import CPU, DDP, FSDP1, FSDP2, GRAD_ACCUM, GRAD_CLIP, OptimizerSpec

SPECS: list[OptimizerSpec] = []  # in registry order; lit_optim/specs/all.py collects them
register = SPECS.append

_GPU_ONLY = frozenset({DDP, GRAD_CLIP, GRAD_ACCUM})
_ALL = frozenset({CPU, DDP, FSDP2, GRAD_CLIP, GRAD_ACCUM})
# FSDP2: torchao picks low-bit or fp32 state per tensor it sees, which under FSDP2 is each rank's shard
# (pytorch/ao#4912); lit_optim replaces that choice with one per parameter, and keeps torch's AOTAutograd cache (which
# keys a DTensor by its global shape, not its shard or the state type inside) out of the compiled DTensor step
# (lit_optim/builders/torchao_shards.py), with a compile cache directory per rank (lit_optim/compile_cache.py).
# 8-bit and 4-bit: exact DCP resume on 2 CPU ranks sharing one cache (tests/test_fsdp2_resume.py, slow). FP8 takes the
# same path but needs CUDA >= 8.9, and no multi-GPU machine has run it yet: refused until one does.
_WHY_FP8 = {FSDP2: "FP8 state needs CUDA (compute capability >= 8.9) and its FSDP2 path has not been run on GPUs yet "
                   "(the 8-bit and 4-bit names resume exactly under FSDP2 on CPU); use DDP, or adamw_torch_8bit or "
                   "adamw_fused_8bit under FSDP2"}
_WHY = {FSDP1: "FSDP1's optimizer state dict, which every checkpoint calls, cannot gather torchao's quantized state "
               "tensors"}
_WHY_FP8 = {**_WHY_FP8, **_WHY}
_NOTE = "Only tensors with >= 4096 elements divisible by block_size get low-bit state; the rest keep fp32."

# adamw_torch_8bit/4bit are Hugging Face names: HF's Trainer passes weight_decay 0.0 (TrainingArguments' default, not
# torchao's 0.01) and block_size 256 for both, so these names default to the same; adam_* are lit_optim's own.
for decoupled, prefix, label in ((True, "adamw", "AdamW"), (False, "adam", "Adam")):
    hf = {"weight_decay": 0.0} if decoupled else {}
    block4 = 256 if decoupled else 128
    register(OptimizerSpec(
        name=f"{prefix}_torch_8bit", backend="torchao", target=f"torchao.optim:{label}8bit", bits=8,
        state_bytes=theory.torchao_states(2, 8), notes=_NOTE, defaults=hf, supports=_ALL, unsupported_why=_WHY,
        description=f"torchao {label}8bit: block-wise (256) 8-bit dynamic-tree quantized moments.",
    ))
    register(OptimizerSpec(
        name=f"{prefix}_torch_4bit", backend="torchao", target=f"torchao.optim:{label}4bit", bits=4,
        state_bytes=theory.torchao_states(2, 4), defaults={**hf, "block_size": block4}, supports=_ALL,
        unsupported_why=_WHY,
        notes=_NOTE + (" block_size defaults to 256 as in Hugging Face's Trainer (torchao's own default is 128)."
                       if decoupled else ""),
        description=f"torchao {label}4bit: block-wise ({block4}) 4-bit quantized moments.",
    ))
    register(OptimizerSpec(
        name=f"{prefix}_fp8", backend="torchao", target=f"torchao.optim:{label}Fp8", bits=8,
        state_bytes=theory.torchao_states(2, "fp8"), requires_cuda=True, min_compute_capability=(8, 9),
        supports=_GPU_ONLY, unsupported_why=_WHY_FP8, aliases=(f"{prefix}_torch_fp8",), notes=_NOTE,
        description=f"torchao {label}Fp8: block-wise scaled float8 (e4m3) moments; CUDA compute capability >= 8.9.",
    ))
