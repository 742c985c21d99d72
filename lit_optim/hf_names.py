"""Hugging Face Trainer `optim` strings (transformers' `OptimizerNames`) and what lit_optim does with each.

Names whose backend lit_optim wraps are registry names or aliases; the rest (`OUT_OF_SCOPE`) are known to the registry
as unsupported, so using one gives a reason and an alternative rather than "unknown name".
"""

from __future__ import annotations

HF_TRAINER_NAMES = frozenset(
    """adamw_torch adamw_torch_fused adamw_torch_xla adamw_torch_npu_fused adafactor adamw_anyprecision
    adamw_torch_4bit adamw_torch_8bit ademamix sgd adagrad adamw_bnb_8bit adamw_8bit ademamix_8bit lion_8bit lion_32bit
    paged_adamw_32bit paged_adamw_8bit paged_ademamix_32bit paged_ademamix_8bit paged_lion_32bit paged_lion_8bit rmsprop
    rmsprop_bnb rmsprop_bnb_8bit rmsprop_bnb_32bit galore_adamw galore_adamw_8bit galore_adafactor
    galore_adamw_layerwise
    galore_adamw_8bit_layerwise galore_adafactor_layerwise lomo adalomo grokadamw schedule_free_radam
    schedule_free_adamw schedule_free_sgd apollo_adamw apollo_adamw_layerwise stable_adamw""".split()
)

# HF names outside lit_optim's backends, with the reason and the closest lit_optim name.
OUT_OF_SCOPE = {
    "adamw_torch_xla": "it needs torch_xla (TPU); on GPU or CPU use 'adamw_torch' or 'adamw_torch_fused'.",
    "adamw_torch_npu_fused": "it needs torch_npu (Ascend); on GPU or CPU use 'adamw_torch_fused'.",
    "adamw_anyprecision": "it needs torchdistx, which is unmaintained; for bf16 state use 'adamw_torch_8bit' or "
    "'adamw_bnb_8bit', or bf16_stochastic_round=True with a torchao optimizer.",
    "grokadamw": "it needs the grokadamw package, which lit_optim does not wrap; use 'adamw_torch'.",
}

