"""lit_optim's own fused low-bit optimizers (`lit_optim.optimizers.lowbit`): one Triton launch per step on CUDA, the
same math in plain torch on CPU."""

from __future__ import annotations

from lit_optim import theory
from lit_optim.spec import CPU, DDP, FSDP1, FSDP2, GRAD_ACCUM, GRAD_CLIP, OptimizerSpec

SPECS: list[OptimizerSpec] = []  # in registry order; lit_optim/specs/all.py collects them
register = SPECS.append

# FSDP2: each rank steps its shard and keeps codes for it, sized for the largest shard (the same length and kind of
# codes on every rank); torch.distributed.checkpoint saves each rank's own and a resume on the same number of ranks is
# exact (tests/test_fsdp2_resume.py). Another number of ranks is refused: the blocks would fall elsewhere.
_SUPPORTS = frozenset({CPU, DDP, FSDP2, GRAD_CLIP, GRAD_ACCUM})
_WHY = {FSDP1: "its codes and block scales are not shaped like the 1-D parameter slices FSDP1 hands it, so FSDP1's "
               "optimizer state dict, which every checkpoint calls, fails on them"}
_NOTE = ("Every tensor gets low-bit state (the last block padded), whatever its size. CUDA: one fused Triton launch "
         "per step, no compilation per shape; CPU: the same math in plain torch. stochastic_rounding=True rounds "
         "bf16 parameters stochastically. FSDP2: sharded checkpoints resume exactly on the same number of ranks.")
_CODES = {8: "int8 sqrt-companded first moment, uint8 fourth-root second moment",
          4: "4-bit sqrt-companded first moment, 4-bit fourth-root second moment"}

# weight_decay defaults to 0.0 as for every other AdamW name in the registry (Hugging Face's default), so that
# `lit-optim compare optim=adamw_torch,adamw_fused_8bit,...` changes the optimizer and nothing else.
for prefix, cls, label in (("adamw", "LowBitAdamW", "AdamW"), ("adam", "LowBitAdam", "Adam (L2 weight decay)")):
    for bits in (8, 4):
        register(OptimizerSpec(
            name=f"{prefix}_fused_{bits}bit", backend="lit_optim", target=f"lit_optim.optimizers.lowbit:{cls}",
            bits=bits, fixed={"bits": bits},
            defaults={"block_size": theory.FUSED_DEFAULT_BLOCK[bits], "weight_decay": 0.0},
            state_bytes=theory.fused_lowbit_states(2, bits), supports=_SUPPORTS, unsupported_why=_WHY,
            notes=_NOTE,
            description=f"lit_optim {label}, fused step: block-wise ({theory.FUSED_DEFAULT_BLOCK[bits]}) "
                        f"{_CODES[bits]}.",
        ))
for bits in (8, 4):
    register(OptimizerSpec(
        name=f"lion_fused_{bits}bit", backend="lit_optim", target="lit_optim.optimizers.lowbit:LowBitLion",
        bits=bits, fixed={"bits": bits}, defaults={"block_size": theory.FUSED_DEFAULT_BLOCK[bits]},
        state_bytes=theory.fused_lowbit_states(1, bits), supports=_SUPPORTS, unsupported_why=_WHY,
        notes=_NOTE,
        description=f"lit_optim Lion, fused step: one block-wise ({theory.FUSED_DEFAULT_BLOCK[bits]}) {bits}-bit "
                    "sqrt-companded momentum.",
    ))
