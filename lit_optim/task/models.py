"""Model factory for the task: ``{"arch": "tiny", ...}`` or ``{"arch": "llama", ...}`` (transformers extra)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from lit_optim.errors import BackendNotInstalledError, HyperparameterError, MissingPathError
from lit_optim.task.tiny_lm import TinyLM


def build_model(config: Mapping[str, Any]) -> nn.Module:
    cfg = dict(config)
    arch = cfg.pop("arch", "tiny")
    if arch == "tiny":
        try:
            return TinyLM(**cfg)
        except TypeError as err:
            raise HyperparameterError(f"model (arch=tiny): {err}") from None
    if arch == "llama":
        return _build_llama(cfg)
    raise HyperparameterError(f"Unknown model arch {arch!r}; choose 'tiny' or 'llama'.")


def _build_llama(cfg: dict[str, Any]) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise BackendNotInstalledError(
            "model arch 'llama' needs transformers: pip install 'lit-optim[transformers]'"
        ) from None
    pretrained = cfg.pop("pretrained", None)
    gradient_checkpointing = cfg.pop("gradient_checkpointing", False)
    dtype = cfg.pop("dtype", None)
    if pretrained:
        path = os.path.expanduser(str(pretrained))
        if not os.path.isdir(path):
            # Never fall back to random weights silently when weights were asked for.
            raise MissingPathError(
                f"model.pretrained={str(pretrained)!r} is not a directory. Give a local model directory (config.json + "
                f"*.safetensors; nothing is downloaded), or model.pretrained=null for random weights."
            )
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        model.train()  # from_pretrained returns eval mode, and Lightning does not switch it back
    else:
        # No weights here: the architecture from its config, randomly initialised -- directly in `dtype`, so an 8B
        # model is not first materialised in fp32.
        import torch

        config = transformers.LlamaConfig(**cfg)
        torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    if gradient_checkpointing:
        # transformers 5 renamed gradient_checkpointing_enable; keep working with both.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    return model
