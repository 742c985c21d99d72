"""Memory-efficient optimizers lit_optim implements: GaLore around any inner optimizer, APOLLO, Adam-mini, and the
absolute-lr Adafactor GaLore's Adafactor variant uses.

State theories are per targeted 2-D weight (GaLore/APOLLO project only ``nn.Linear`` weights that are not the
embedding or the head; every other tensor costs its inner optimizer's own theory). Projected shapes are small, so
bitsandbytes/torchao inners keep fp32 state for projections under 4096 elements -- the theory says so, because it
applies the inner's own formula to the projected shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from lit_optim import theory
from lit_optim.builders.lowrank import adam_mini_arguments, adam_mini_builder, lowrank_arguments, lowrank_builder
from lit_optim.optimizers.projection import factor_elements, projected_shape, projection_side
from lit_optim.spec import CPU, DDP, FSDP1, FSDP2, GRAD_ACCUM, GRAD_CLIP, OptimizerSpec
from lit_optim.specs import bnb_specs, extra_specs, torch_specs, torchao_specs

SPECS: list[OptimizerSpec] = []  # in registry order; lit_optim/specs/all.py collects them
register = SPECS.append

FP32 = theory.FP32
# FSDP2 shards each weight: a projection (SVD or random), a per-head/per-row block or a factored statistic of a shard
# is not the one of the whole matrix.
NO_FSDP = frozenset({CPU, DDP, GRAD_CLIP, GRAD_ACCUM})
NO_FSDP_WHY = {FSDP1: "a projection, per-head block or factored statistic needs the whole matrix, and FSDP1 hands it "
                      "1-D slices",
               FSDP2: "a projection, per-head block or factored statistic of a shard is not the whole matrix's"}
GALORE_DEFAULTS = {"rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}
APOLLO_DEFAULTS = {"rank": 128, "update_proj_gap": 200, "scale": 1.0, "proj_type": "std", "scale_type": "channel",
                   "norm_growth_limit": 1.01}


def adafactor_theory(shape: tuple[int, ...], hp: Mapping[str, Any]) -> float:
    """Row and column statistics for a matrix, a full second moment otherwise (no first moment)."""
    n = 1
    for s in shape:
        n *= s
    return FP32 * (shape[0] + shape[1]) if len(shape) == 2 else FP32 * n


def inner_spec(name: str) -> OptimizerSpec:
    """A plain (non-composite) spec by name or alias: what a projection can step. Composite names are declared
    here and are never inner optimizers, so the base backends' lists are all that is searched."""
    for spec in (*torch_specs.SPECS, *torchao_specs.SPECS, *bnb_specs.SPECS, *extra_specs.SPECS, *SPECS):
        if name in spec.names:
            return spec
    raise KeyError(name)


def lowrank_theory(inner: OptimizerSpec | None, defaults: Mapping[str, Any], *, store_factors: bool,
                   extra: float = 0.0):
    """Per 2-D target: the projection factors (GaLore) + the inner optimizer's theory on the projected shape.
    `inner` None: the generic name, whose inner is the ``inner`` hyperparameter."""

    def theory_fn(shape: tuple[int, ...], hp: Mapping[str, Any]) -> float:
        hp = {**defaults, **hp}
        spec = inner or inner_spec(hp.get("inner") or "adamw_torch")
        inner_hp = {**spec.defaults, **dict(hp.get("inner_kwargs") or {}), **hp}
        if len(shape) != 2:
            return spec.state_bytes(shape, inner_hp)
        side = projection_side(shape, hp["proj_type"])
        own = FP32 * factor_elements(shape, hp["rank"], side) if store_factors else 0.0
        limiter = FP32 if extra and hp.get("norm_growth_limit") else 0.0
        return own + limiter + spec.state_bytes(projected_shape(shape, hp["rank"], side), inner_hp)

    return theory_fn


def _lowrank(name: str, target: str, inner: str | None, *, theory_defaults: Mapping[str, Any], store_factors: bool,
             extra: float = 0.0, **fields) -> OptimizerSpec:
    """A GaLore/APOLLO spec; a fixed inner's spec is bound into builder, arguments and theory here."""
    bound = inner_spec(inner) if inner else None
    return OptimizerSpec(
        name=name, backend="lit_optim", target=target, supports=NO_FSDP, unsupported_why=NO_FSDP_WHY,
        builder=partial(lowrank_builder, inner=bound), arguments=partial(lowrank_arguments, inner=bound),
        fixed={"inner": inner} if inner else {},
        # bitsandbytes 8-bit inners keep the (never projected) embedding's state at 32 bits, as the plain name does;
        # the generic name takes the switch too, for when its inner is one of those.
        embedding_state_32bit=bound.embedding_state_32bit if bound else True,
        state_bytes=lowrank_theory(bound, theory_defaults, store_factors=store_factors, extra=extra), **fields)


register(OptimizerSpec(
    name="adafactor", backend="lit_optim", target="lit_optim.optimizers.adafactor:Adafactor", aliases=("adafactor_hf",),
    state_bytes=adafactor_theory, supports=NO_FSDP, unsupported_why=NO_FSDP_WHY, defaults={"lr": 1e-3},
    description="Adafactor with an absolute learning rate (Hugging Face's relative_step=False, scale_parameter=False): "
                "factored second moment, update clipping, no first moment.",
    notes="Hugging Face's 'adafactor' builds transformers' own Adafactor class with these settings; this is "
          "lit_optim's "
          "implementation of the same update (no transformers dependency; the steps agree, tests/test_hf_parity.py). "
          "PyTorch's Adafactor is 'adafactor_torch': it steps min(lr, 1/sqrt(t)) times the parameter's RMS.",
))

# Where the Hugging Face names build something else than HF's Trainer, on purpose (shown by `lit-optim describe`).
HF_LOWRANK_DIFFERENCES = (
    "Differs from Hugging Face's Trainer on purpose: its 'all-linear' also targets lm_head (lit_optim keeps the head "
    "full-rank; list it in target_modules to project it); it passes only lr and the projection settings, so "
    "weight_decay and adam_beta/epsilon are not applied and non-targeted parameters get the class defaults in one "
    "group, while lit_optim gives non-targeted parameters its decay/no-decay groups with weight_decay and the inner "
    "optimizer's betas/eps.")
_GALORE_NOTE = ("Targets: nn.Linear weights except embeddings and the head (target_modules: 'all-linear', a regex or "
                "names, as Hugging Face's optim_target_modules); other tensors get the inner optimizer with the "
                "normal param groups, weight decay included. State theory is per targeted weight. "
                + HF_LOWRANK_DIFFERENCES)
_GALORE_CLASS, _APOLLO_CLASS = "lit_optim.optimizers.galore:GaLore", "lit_optim.optimizers.apollo:Apollo"
# name, inner registry name, bits of the inner's bulk state, description
_GALORE = [
    ("galore_adamw", "adamw_torch", 32, "GaLore projection around PyTorch AdamW (fp32 low-rank moments)."),
    ("galore_adamw_8bit", "adamw_bnb_8bit", 8, "GaLore projection around bitsandbytes AdamW8bit (8-bit low-rank "
                                               "moments where the projection has >= 4096 elements)."),
    ("galore_adamw_torch_8bit", "adamw_torch_8bit", 8, "GaLore projection around torchao AdamW8bit (8-bit low-rank "
                                                       "moments where the projection has >= 4096 elements divisible "
                                                       "by 256)."),
    ("galore_adamw_4bit", "adamw_torch_4bit", 4, "GaLore projection around torchao AdamW4bit (4-bit low-rank moments "
                                                 "where the projection has >= 4096 elements divisible by 128)."),
    ("galore_adafactor", "adafactor", 32, "GaLore projection around Adafactor (absolute lr; factored second "
                                          "moment of the projection)."),
]
# adamw_torch_4bit defaults to Hugging Face's block 256; galore_adamw_4bit is lit_optim's own name and keeps torchao's
# 128, under which more of the small projected moments divide evenly and so get 4-bit state.
_GALORE_DEFAULTS = {"galore_adamw_4bit": {"block_size": 128}}
for _name, _inner, _bits, _desc in _GALORE:
    register(_lowrank(_name, _GALORE_CLASS, _inner, theory_defaults=GALORE_DEFAULTS, store_factors=True, bits=_bits,
                      notes=_GALORE_NOTE, defaults=_GALORE_DEFAULTS.get(_name, {}), description=_desc))
register(_lowrank(
    "galore", _GALORE_CLASS, None, theory_defaults=GALORE_DEFAULTS, store_factors=True,
    notes=_GALORE_NOTE + " The inner optimizer's own arguments go in inner_kwargs.",
    description="GaLore projection around any registry optimizer (hyperparameter inner, default adamw_torch).",
))

_APOLLO_NOTE = ("Random projections regenerate from a stored seed, so the state is the low-rank moments plus one "
                "scalar per target. Update multiplied by sqrt(scale) as in the reference implementation. "
                + HF_LOWRANK_DIFFERENCES.replace("it passes only lr and the projection settings, so weight_decay and "
                                                 "adam_beta/epsilon are not applied and",
                                                 "it applies adam_beta/epsilon to targeted weights only, no "
                                                 "weight_decay, and"))
register(_lowrank(
    "apollo_adamw", _APOLLO_CLASS, "adamw_torch", theory_defaults=APOLLO_DEFAULTS, store_factors=False, extra=1,
    defaults={"eps": 1e-6}, notes=_APOLLO_NOTE,
    description="APOLLO: AdamW moments of a random rank-r projection estimate channel-wise learning-rate scaling of "
                "an SGD-like update (Hugging Face defaults: rank 128, gap 200, scale 1).",
))
_MINI = {"rank": 1, "scale_type": "tensor", "scale": 128.0}
register(_lowrank(
    "apollo_mini", _APOLLO_CLASS, "adamw_torch", theory_defaults={**APOLLO_DEFAULTS, **_MINI}, store_factors=False,
    extra=1, defaults={"eps": 1e-6, **_MINI}, notes=_APOLLO_NOTE,
    description="APOLLO-Mini: rank-1 projection, one tensor-wise scaling factor per weight, scale 128 -- SGD-like "
                "memory.",
))


def adam_mini_theory(shape: tuple[int, ...], hp: Mapping[str, Any]) -> float:
    """First moment per element + one second moment per row (query/key: per head, fewer); 1-D: one per tensor."""
    n = 1
    for s in shape:
        n *= s
    return FP32 * n + FP32 * (shape[0] if len(shape) >= 2 else 1)


register(OptimizerSpec(
    name="adam_mini", backend="lit_optim", target="lit_optim.optimizers.adam_mini:AdamMini", builder=adam_mini_builder,
    arguments=adam_mini_arguments,
    supports=NO_FSDP, unsupported_why=NO_FSDP_WHY, state_bytes=adam_mini_theory,
    description="Adam-mini: one second moment per Hessian block (query/key: per head; value, attention output, MLP: "
                "per output neuron; embedding/head: per token; 1-D: per tensor).",
    notes="Heads come from the model (n_heads attribute, or config.num_attention_heads/num_key_value_heads) or from "
          "the hyperparameters n_heads, n_kv_heads, d_model. Theory counts one block per row; query/key have one "
          "per head, 4*(rows - heads) bytes fewer.",
))
