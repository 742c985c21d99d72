"""Optimizers from small third-party packages, installed as lit_optim extras."""

from __future__ import annotations

from lit_optim import theory
from lit_optim.spec import ALL_FEATURES, FSDP1, OptimizerSpec

SPECS: list[OptimizerSpec] = []  # in registry order; lit_optim/specs/all.py collects them
register = SPECS.append

_SF = ("Schedule-free: no LR decay schedule needed; built in train mode, and lit_optim switches "
       "optimizer.train()/eval() with the module.")
register(OptimizerSpec(
    name="schedule_free_adamw", backend="schedulefree", target="schedulefree:AdamWScheduleFree",
    state_bytes=theory.fp32_states(2), train_eval_switch=True, notes=_SF,
    description="Schedule-free AdamW (Defazio et al.), fp32 z and second-moment state.",
))
register(OptimizerSpec(
    name="schedule_free_radam", backend="schedulefree", target="schedulefree:RAdamScheduleFree",
    state_bytes=theory.fp32_states(2), train_eval_switch=True, notes=_SF,
    description="Schedule-free RAdam: no warmup and no LR schedule needed.",
))
register(OptimizerSpec(
    name="schedule_free_sgd", backend="schedulefree", target="schedulefree:SGDScheduleFree",
    state_bytes=theory.fp32_states(1), train_eval_switch=True, notes=_SF,
    description="Schedule-free SGD with momentum, one fp32 z buffer.",
))
register(OptimizerSpec(
    name="stable_adamw", backend="optimi", target="optimi:StableAdamW", state_bytes=theory.fp32_states(2),
    # Hugging Face's Trainer passes TrainingArguments' betas, eps and weight decay, not optimi's defaults
    # ((0.9, 0.99), 1e-6, 0.01).
    defaults={"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
    supports=ALL_FEATURES - {FSDP1},
    unsupported_why={FSDP1: "its update clipping takes each parameter's RMS, and FSDP1 hands it one rank's 1-D slice"},
    description="StableAdamW (optimi): AdamW with AdaFactor-style update clipping; Kahan summation for bf16 params.",
))
