"""bitsandbytes optimizers: 8-bit block-wise state, 32-bit state, and paged (CUDA unified memory) variants.

bitsandbytes' plain `AdamW` is 32-bit unless told otherwise; every name here pins its class and bits explicitly, and
`build.py` checks the built object against `bits`/`paged`.
"""

from __future__ import annotations

from lit_optim import theory
from lit_optim.spec import CPU, DDP, FSDP1, FSDP2, GRAD_ACCUM, GRAD_CLIP, OptimizerSpec

SPECS: list[OptimizerSpec] = []  # in registry order; lit_optim/specs/all.py collects them
register = SPECS.append

# FSDP cannot save bitsandbytes' 8-bit/paged state through its optimizer state dict (bnb#89, #1403, #1732).
_NO_FSDP = frozenset({CPU, DDP, GRAD_CLIP, GRAD_ACCUM})
_WHY = {FSDP1: "its 8-bit names pick 8-bit or 32-bit state per 1-D slice FSDP1 hands them (a weight split over two "
               "ranks gets both, which FSDP1's optimizer state dict fails on); the 32-bit names are refused with "
               "them until tested",
        FSDP2: "bitsandbytes has no DTensor support and its 8-bit/paged state cannot go through FSDP's optimizer "
               "state dict"}


# Hugging Face's Trainer passes TrainingArguments' defaults where bitsandbytes' differ: weight_decay 0.0 (AdamW and
# AdEMAMix default to 0.01) and Lion betas (adam_beta1, adam_beta2) = (0.9, 0.999) (Lion's own are (0.9, 0.99)).
_HF_ADAM = {"weight_decay": 0.0}
_HF_LION = {"betas": (0.9, 0.999)}


def _bnb(name, cls, bits, states, desc, *, paged=False, aliases=(), fixed=None, defaults=None, theory_fn=None,
         supports=_NO_FSDP, notes=""):
    register(OptimizerSpec(
        name=name, backend="bitsandbytes", target=f"bitsandbytes.optim:{cls}", bits=bits, paged=paged,
        state_bytes=theory_fn or theory.bnb_states(states, bits), aliases=aliases, fixed=fixed or {},
        defaults=defaults or {}, supports=supports, embedding_state_32bit=bits == 8, unsupported_why=_WHY,
        description=f"bitsandbytes {cls}: {desc}" + (" State in paged (CUDA unified) memory." if paged else ""),
        notes=notes or ("Tensors under min_8bit_size (4096) elements keep 32-bit state." if bits == 8 else ""),
    ))


_bnb("adamw_bnb_8bit", "AdamW8bit", 8, 2, "block-wise 8-bit AdamW moments.", aliases=("adamw_8bit",),
     defaults=_HF_ADAM)
_bnb("adamw_32bit", "AdamW32bit", 32, 2, "32-bit AdamW moments (bnb kernels).", aliases=("adamw_bnb_32bit",))
_bnb("paged_adamw_8bit", "PagedAdamW8bit", 8, 2, "block-wise 8-bit AdamW moments.", paged=True, defaults=_HF_ADAM)
_bnb("paged_adamw_32bit", "PagedAdamW32bit", 32, 2, "32-bit AdamW moments.", paged=True, aliases=("paged_adamw",),
     defaults=_HF_ADAM)
_bnb("lion_8bit", "Lion8bit", 8, 1, "block-wise 8-bit Lion momentum.", defaults=_HF_LION)
_bnb("lion_32bit", "Lion32bit", 32, 1, "32-bit Lion momentum.", aliases=("lion",), defaults=_HF_LION)
_bnb("paged_lion_8bit", "PagedLion8bit", 8, 1, "block-wise 8-bit Lion momentum.", paged=True, defaults=_HF_LION)
_bnb("paged_lion_32bit", "PagedLion32bit", 32, 1, "32-bit Lion momentum.", paged=True, aliases=("paged_lion",),
     defaults=_HF_LION)
_bnb("rmsprop_bnb", "RMSprop", 32, 1, "RMSprop, 32-bit state (Hugging Face's default bits).", fixed={"optim_bits": 32})
_bnb("rmsprop_bnb_8bit", "RMSprop8bit", 8, 1, "block-wise 8-bit RMSprop square average.")
_bnb("rmsprop_bnb_32bit", "RMSprop32bit", 32, 1, "32-bit RMSprop square average.")
_bnb("ademamix", "AdEMAMix", 32, 3, "AdEMAMix (two EMAs of the gradient plus one of its square), 32-bit.",
     fixed={"optim_bits": 32}, defaults=_HF_ADAM)
_bnb("ademamix_8bit", "AdEMAMix8bit", 8, 3, "AdEMAMix with block-wise 8-bit states.", defaults=_HF_ADAM)
_bnb("paged_ademamix_8bit", "PagedAdEMAMix8bit", 8, 3, "AdEMAMix with block-wise 8-bit states.", paged=True,
     defaults=_HF_ADAM)
# Not bitsandbytes' PagedAdEMAMix32bit: in 0.50 it (like AdEMAMix32bit) skips AdEMAMix's state setup and gives the
# two EMAs one tensor shaped like the parameter -- a shape error on CPU, NaN losses on CUDA. Hugging Face builds
# AdEMAMix(optim_bits=32, is_paged=True); PagedAdEMAMix with optim_bits=32 is that class. Its double buffer is
# allocated in CUDA managed memory even on CPU (bitsandbytes' CPU build then raises for parameters of >= 1e5
# elements), so the name is CUDA-only.
_bnb("paged_ademamix_32bit", "PagedAdEMAMix", 32, 3, "AdEMAMix, 32-bit states.", paged=True,
     aliases=("paged_ademamix",), fixed={"optim_bits": 32}, supports=_NO_FSDP - {CPU}, defaults=_HF_ADAM,
     notes="CUDA only: bitsandbytes allocates AdEMAMix's paged double buffer with CUDA managed memory.")
_bnb("adagrad_8bit", "Adagrad8bit", 8, 1, "block-wise 8-bit Adagrad accumulator.")
# bitsandbytes refuses SGD without momentum, so the name defaults to the usual 0.9.
_bnb("sgd_8bit", "SGD8bit", 8, 1, "SGD with a block-wise 8-bit momentum buffer.", defaults={"momentum": 0.9},
     theory_fn=theory.bnb_sgd(8))
_bnb("lamb_8bit", "LAMB8bit", 8, 2, "LAMB with block-wise 8-bit moments.")
