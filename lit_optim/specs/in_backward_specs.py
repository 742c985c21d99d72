"""Optimizers that step in the backward pass: `<name>_layerwise` (Hugging Face's names), LOMO and AdaLomo.

Any registry name also takes ``in_backward: true``; these names fix it. Stepping in backward cannot honour global-norm
gradient clipping, DDP/FSDP or fp16 loss scaling (see lit_optim/optimizers/in_backward.py): `supports` is CPU and
gradient accumulation, and the optimizer refuses the rest before step 1 with the reason.
"""

from __future__ import annotations

from functools import partial

from lit_optim import theory
from lit_optim.builders.in_backward import layerwise_arguments, layerwise_builder
from lit_optim.optimizers.in_backward import IN_BACKWARD_SUPPORTS
from lit_optim.spec import OptimizerSpec
from lit_optim.specs.lowrank_specs import SPECS as LOWRANK
from lit_optim.specs.lowrank_specs import adafactor_theory

SPECS: list[OptimizerSpec] = []  # in registry order; lit_optim/specs/all.py collects them
register = SPECS.append

_HF_DIFF = "Differs from Hugging Face"  # the base name's HF differences apply to its layer-wise name too
_LOMO_HF = (" Differs from Hugging Face's Trainer on purpose: HF passes LOMO/AdaLomo (lomo_optim) only lr, so "
            "weight_decay is not applied; lit_optim applies it to its decay group.")
_NOTE = ("Steps each parameter in its post-accumulate-grad hook and frees its gradient. No Trainer gradient clipping "
         "(use clip_per_param_norm), no DDP/FSDP, no fp16 GradScaler; gradient accumulation works.")

for _base in ("galore_adamw", "galore_adamw_8bit", "galore_adafactor", "apollo_adamw", "apollo_mini"):
    _spec = next(s for s in LOWRANK if s.name == _base)
    register(OptimizerSpec(
        name=f"{_base}_layerwise", backend=_spec.backend, target="lit_optim.optimizers.in_backward:InBackwardOptimizer",
        builder=partial(layerwise_builder, base=_spec), arguments=partial(layerwise_arguments, base=_spec),
        fixed={"base": _base}, defaults=dict(_spec.defaults), bits=_spec.bits,
        embedding_state_32bit=_spec.embedding_state_32bit,
        state_bytes=_spec.state_bytes, supports=_spec.supports & IN_BACKWARD_SUPPORTS,
        notes=_NOTE + (" " + _spec.notes[_spec.notes.find(_HF_DIFF):] if _HF_DIFF in _spec.notes else ""),
        description=f"{_base} stepped in backward, one parameter at a time (optimizer-in-backward).",
    ))

register(OptimizerSpec(
    name="lomo", backend="lit_optim", target="lit_optim.optimizers.lomo:Lomo", state_bytes=theory.no_state, bits=None,
    supports=IN_BACKWARD_SUPPORTS, notes=_NOTE + _LOMO_HF,
    description="LOMO: SGD fused into the backward pass (no optimizer state, gradients freed as they are used).",
))
register(OptimizerSpec(
    name="adalomo", backend="lit_optim", target="lit_optim.optimizers.lomo:AdaLomo", state_bytes=adafactor_theory,
    supports=IN_BACKWARD_SUPPORTS, notes=_NOTE + _LOMO_HF,
    description="AdaLomo: factored second moment and grouped update normalisation, fused into the backward pass.",
))
