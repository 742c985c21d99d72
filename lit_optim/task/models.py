"""Model factory for the task: ``{"arch": "tiny", ...}`` or ``{"arch": "llama", ...}`` (transformers extra).

`check_model_config` validates a config cheaply (no weights are made), so a mistake is reported when the
LightningModule is constructed; `build_model` makes the model on the *current default device and dtype*. The task
calls it from Lightning's ``configure_model`` hook, where the strategy has set both (the GPU, and bf16 under
``precision="bf16-true"``), so an 8B model is initialised on the GPU in seconds instead of on the CPU in minutes, and
host memory never holds the weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lit_optim.errors import BackendNotInstalledError, HyperparameterError, MissingPathError
from lit_optim.task.tiny_lm import TinyLM

ARCHS = ("tiny", "llama")


def check_model_config(config: Mapping[str, Any]) -> None:
    """Everything about the model config that can be checked without building it."""
    cfg = dict(config)
    arch = cfg.pop("arch", "tiny")
    if arch not in ARCHS:
        raise HyperparameterError(f"Unknown model arch {arch!r}; choose one of {', '.join(map(repr, ARCHS))}.")
    if arch == "tiny":
        with torch.device("meta"):  # shapes and arguments only, no memory
            _tiny(cfg)
        return
    _transformers()
    _torch_dtype(cfg.get("dtype"))
    if cfg.get("pretrained"):
        _pretrained_dir(cfg["pretrained"])


def build_model(config: Mapping[str, Any]) -> nn.Module:
    cfg = dict(config)
    arch = cfg.pop("arch", "tiny")
    if arch == "tiny":
        return _tiny(cfg)
    if arch == "llama":
        return _build_llama(cfg)
    raise HyperparameterError(f"Unknown model arch {arch!r}; choose one of {', '.join(map(repr, ARCHS))}.")


def _tiny(cfg: dict[str, Any]) -> nn.Module:
    try:
        return TinyLM(**cfg)
    except TypeError as err:
        raise HyperparameterError(f"model (arch=tiny): {err}") from None


def _transformers():
    try:
        import transformers
    except ImportError:
        raise BackendNotInstalledError(
            "model arch 'llama' needs transformers: pip install 'lit-optim[transformers]'"
        ) from None
    return transformers


def _torch_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise HyperparameterError(
            f"model.dtype={dtype!r} is not a floating-point torch dtype; use bfloat16, float16, float32 or null."
        )
    return value


def _pretrained_dir(pretrained: Any) -> str:
    path = os.path.expanduser(str(pretrained))
    if not os.path.isdir(path):
        # Never fall back to random weights silently when weights were asked for.
        raise MissingPathError(
            f"model.pretrained={str(pretrained)!r} is not a directory. Give a local model directory (config.json + "
            f"*.safetensors; nothing is downloaded), or model.pretrained=null for random weights."
        )
    return path


def _build_llama(cfg: dict[str, Any]) -> nn.Module:
    transformers = _transformers()
    pretrained = cfg.pop("pretrained", None)
    gradient_checkpointing = cfg.pop("gradient_checkpointing", False)
    dtype = _torch_dtype(cfg.pop("dtype", None)) or torch.get_default_dtype()
    if pretrained:
        from lit_optim.task.pretrained import load_pretrained

        model = load_pretrained(_pretrained_dir(pretrained), dtype=dtype)
    else:
        # Random init, directly in `dtype` on the default device: an 8B model is never materialised in fp32 or on
        # the host.
        model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**cfg), dtype=dtype)
    if gradient_checkpointing:
        # transformers 5 renamed gradient_checkpointing_enable; keep working with both.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    return model
