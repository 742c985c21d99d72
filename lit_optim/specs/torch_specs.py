"""Optimizers that ship with PyTorch."""

from __future__ import annotations

from lit_optim import theory
from lit_optim.spec import ALL_FEATURES, FSDP1, FSDP2, OptimizerSpec

SPECS: list[OptimizerSpec] = []  # in registry order; lit_optim/specs/all.py collects them
register = SPECS.append

# Hugging Face names take TrainingArguments' defaults where the class's differ (weight_decay 0.0, not AdamW's 0.01),
# so a config with only lr builds what the Trainer builds (lit_optim.hf_args, tests/test_hf_parity.py).
HF_DEFAULTS = {"weight_decay": 0.0}

register(OptimizerSpec(
    name="adamw_torch", backend="torch", target="torch.optim:AdamW", state_bytes=theory.fp32_states(2),
    defaults=HF_DEFAULTS, description="PyTorch AdamW (foreach), fp32 state.",
))
register(OptimizerSpec(
    name="adamw_torch_fused", backend="torch", target="torch.optim:AdamW", fixed={"fused": True},
    defaults=HF_DEFAULTS, state_bytes=theory.fp32_states(2),
    description="PyTorch AdamW with the fused kernel (CUDA and CPU), fp32 state.",
))
register(OptimizerSpec(
    name="adam", backend="torch", target="torch.optim:Adam", state_bytes=theory.fp32_states(2),
    aliases=("adam_torch",), description="PyTorch Adam (L2 weight decay, not decoupled), fp32 state.",
))
register(OptimizerSpec(
    name="sgd", backend="torch", target="torch.optim:SGD", state_bytes=theory.sgd_like, bits=32,
    description="PyTorch SGD; a momentum buffer only when momentum > 0.",
))
register(OptimizerSpec(
    name="adagrad", backend="torch", target="torch.optim:Adagrad", state_bytes=theory.fp32_states(1),
    description="PyTorch Adagrad, one fp32 accumulator.",
))
register(OptimizerSpec(
    name="rmsprop", backend="torch", target="torch.optim:RMSprop", state_bytes=theory.rmsprop_like,
    description="PyTorch RMSprop; extra buffers with momentum or centered=True.",
))
register(OptimizerSpec(
    name="adafactor_torch", backend="torch", target="torch.optim:Adafactor", state_bytes=theory.factored_second_moment,
    defaults={"lr": 1e-2}, supports=ALL_FEATURES - {FSDP1, FSDP2},
    unsupported_why={
        FSDP1: "it factors each weight's second moment into row and column statistics, and FSDP1 hands it 1-D slices",
        FSDP2: "its row and column statistics of a weight's shard are not the whole weight's (a DTensor shard fails "
               "at its first step)",
    },
    description="PyTorch Adafactor: factored second moment (row + column statistics), no first moment.",
    notes="Not Hugging Face's 'adafactor' (that is lit_optim's absolute-lr Adafactor, registered as 'adafactor'): "
          "PyTorch's steps min(lr, 1/sqrt(t)) times the parameter's RMS.",
))


def _build_muon(groups, spec, kwargs, context):
    from lit_optim.optimizers.muon_adamw import MuonWithAdamW

    return MuonWithAdamW(groups, param_info=context.param_info, **kwargs)


def _muon_theory(shape, hp):
    # Muon keeps one momentum buffer for 2-D hidden weights; everything else (AdamW) keeps two.
    return theory.fp32_states(1 if len(shape) == 2 else 2)(shape, hp)


register(OptimizerSpec(
    name="muon", backend="torch", target="lit_optim.optimizers.muon_adamw:MuonWithAdamW", builder=_build_muon,
    state_bytes=_muon_theory, defaults={"lr": 1e-3}, supports=ALL_FEATURES - {FSDP1},
    unsupported_why={FSDP1: "it orthogonalises whole 2-D weights, and FSDP1 hands it 1-D slices of them"},
    description="PyTorch Muon on 2-D hidden weights plus AdamW on embeddings, head and 1-D params, in one optimizer.",
    notes="The theory is by shape: 4 B/param for 2-D tensors (Muon's momentum); embeddings and the output head are "
          "2-D but take AdamW (8 B/param).",
))
