"""`describe(name)`: one optimizer in words -- what it builds and costs, where it runs, what it takes.

It sits above the registry and the builder (it reads both), so neither has to know about presentation.
"""

from __future__ import annotations

import inspect
from typing import Any

from lit_optim.build import GROUP_KEYS, accepted_arguments
from lit_optim.builders.offload import offload_problem
from lit_optim.hf_names import HF_TRAINER_NAMES
from lit_optim.registry import availability, get_spec
from lit_optim.spec import CPU, OptimizerSpec

# What the common constructor arguments mean; a name's own arguments not listed here are shown with their default.
MEANINGS = {
    "lr": "learning rate",
    "betas": "decay rates of the first- and second-moment averages",
    "eps": "added to the denominator for numerical stability",
    "weight_decay": "weight decay, applied to the 'decay' param group only",
    "amsgrad": "use the maximum of past second moments",
    "momentum": "momentum factor",
    "block_size": "elements per quantization block (one scale each)",
    "bf16_stochastic_round": "round bf16 parameter updates stochastically",
    "optim_bits": "bits of the optimizer state",
    "min_8bit_size": "tensors smaller than this keep 32-bit state",
    "rank": "rank of the gradient projection",
    "update_proj_gap": "steps between projector refreshes",
    "scale": "scale of the projected-back update",
    "proj_type": "which side of the weight is projected",
    "target_modules": "weights that are projected ('all-linear', a regex or a list of names)",
    "inner": "registry name of the optimizer stepping in the projected space",
    "fused": "use the fused kernel",
    "fused_qkv": "names of further fused query/key/value modules whose rows are [q; k; v]",
    "n_heads": "query heads (found on the model when not given)",
    "foreach": "use the multi-tensor kernel",
    "quantize": "keep the moments as 8-bit codes (false: in the parameter's dtype)",
    "master_weight_bits": "24 or 32: error-correction bits give bf16/fp16 weights that precision; null: none",
    "compress_state_dict": "checkpoints hold the 8-bit codes (false: fp32 moments)",
    "check_numerics": "refuse a learning rate too small to change the weights",
    "decouple_lr": "weight decay scaled by lr / initial lr instead of by lr",
}
GROUP_MEANINGS = {
    "no_decay": "extra regexes of parameter names kept out of weight decay",
    "lr_scales": "learning-rate multipliers by parameter kind, e.g. {embedding: 0.1}",
    "in_backward": "step each parameter in its gradient hook (frees gradients at once)",
    "offload": "'cpu': keep the state and take the step on the host",
    "offload_gradients": "with offload: move each gradient to the host during backward",
}


def _hyperparameter_lines(spec: OptimizerSpec, available: bool) -> list[str]:
    if not available:
        return [f"  takes:         (its backend is not installed here: {spec.install_hint})"]
    lines = ["  takes:"]
    for key, default in accepted_arguments(spec).items():
        if key in spec.fixed:
            continue  # the name decides these (bits, paging, fused): shown in "builds"
        value = spec.defaults.get(key, default)
        shown = "required" if value is inspect.Parameter.empty else _short(value)
        meaning = MEANINGS.get(key)
        lines.append(f"    {key} = {shown}" + (f"  -- {meaning}" if meaning else ""))
    lines += [f"    {key}  -- {meaning}" for key, meaning in GROUP_MEANINGS.items() if key in GROUP_KEYS]
    return lines


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _offload_line(spec: OptimizerSpec) -> str:
    problem = offload_problem(spec)
    if problem:
        return "no: " + problem
    return ("optim.offload=cpu (state and step on the host); add optim.offload_gradients=true to move gradients there "
            "during backward")


def describe(name: str) -> str:
    """One optimizer in words: what it builds, its state cost, what it supports, the hyperparameters it takes."""
    spec = get_spec(name)
    fixed = ", ".join(f"{k}={v!r}" for k, v in spec.fixed.items())
    avail = availability(spec)
    lines = [
        f"{spec.name}: {spec.description}",
        f"  builds:        {spec.target.replace(':', '.')}" + (f"({fixed})" if fixed else ""),
        f"  backend:       {spec.backend}" + ("" if avail.ok else f"  [unavailable here: {avail.reason}]"),
        f"  aliases:       {', '.join(spec.aliases) or '-'}",
        f"  state:         {spec.bytes_per_param():.3g} bytes/param on large tensors"
        + (f" ({spec.bits}-bit" + (", paged" if spec.paged else "") + ")" if spec.bits else " (stateless)"),
        "  runs on:       "
        + ("CUDA only" if spec.requires_cuda or CPU not in spec.supports else "CPU and CUDA")
        + (f" (compute capability >= {'.'.join(map(str, spec.min_compute_capability))})"
           if spec.min_compute_capability else ""),
        f"  supports:      {', '.join(sorted(spec.supports))}",
        *(f"  not {feature + ':':<10} {why}" for feature, why in sorted(spec.unsupported_why.items())
          if feature not in spec.supports),
        f"  CPU offload:   {_offload_line(spec)}",
        f"  HF Trainer:    {', '.join(n for n in spec.names if n in HF_TRAINER_NAMES) or 'no'}",
    ]
    # An installed backend lists what the name takes even where this machine cannot run it (no GPU, say).
    lines += _hyperparameter_lines(spec, avail.ok or "not installed" not in avail.reason)
    if spec.notes:
        lines.append(f"  notes:         {spec.notes}")
    return "\n".join(lines)
