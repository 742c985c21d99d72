"""Model factory for the task: ``{"arch": "tiny", ...}`` or ``{"arch": "llama", ...}`` (transformers extra).

`check_model_config` validates a config cheaply (no weights are made), so a mistake is reported when the
LightningModule is constructed; `build_model` makes the model on the *current default device and dtype*. The task
calls it from Lightning's ``configure_model`` hook, where the strategy has set both (the GPU, and bf16 under
``precision="bf16-true"``), so an 8B model is initialised on the GPU in seconds instead of on the CPU in minutes, and
host memory never holds the weights.
"""

from __future__ import annotations

import inspect
import json
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
        _check_heads(cfg.get("d_model", _tiny_default("d_model")), cfg.get("n_heads", _tiny_default("n_heads")),
                     "d_model", "n_heads")
        with torch.device("meta"):  # shapes and arguments only, no memory
            _tiny(cfg)
        return
    _transformers()
    _torch_dtype(cfg.get("dtype"))
    if cfg.get("pretrained"):
        _pretrained_dir(cfg["pretrained"])
    shape = _llama_shape(cfg)
    if shape.get("head_dim") is None:  # an explicit head_dim makes heads independent of the hidden size
        _check_heads(shape["hidden_size"], shape["num_attention_heads"], "hidden_size", "num_attention_heads")
    kv_heads = shape.get("num_key_value_heads") or shape["num_attention_heads"]
    _check_heads(shape["num_attention_heads"], kv_heads, "num_attention_heads", "num_key_value_heads")


def model_limits(config: Mapping[str, Any]) -> dict[str, int]:
    """What the data must fit: the token-id range (``vocab_size``) and the longest sequence (``max_positions``)."""
    cfg = dict(config)
    if cfg.pop("arch", "tiny") == "tiny":
        return {"vocab_size": cfg.get("vocab_size", _tiny_default("vocab_size")),
                "max_positions": cfg.get("max_seq_len", _tiny_default("max_seq_len")),
                "positions_key": "max_seq_len"}
    shape = _llama_shape(cfg)
    return {"vocab_size": shape["vocab_size"], "max_positions": shape["max_position_embeddings"],
            "positions_key": "max_position_embeddings"}


def _tiny_default(name: str) -> Any:
    return inspect.signature(TinyLM).parameters[name].default


def _check_heads(size: Any, heads: Any, size_key: str, heads_key: str) -> None:
    if isinstance(size, int) and isinstance(heads, int) and heads > 0 and size % heads:
        divisors = [h for h in range(1, min(size, 64) + 1) if size % h == 0][-4:]
        raise HyperparameterError(
            f"model.{heads_key}={heads} does not divide model.{size_key}={size}: every head needs an equal share. "
            f"Use a {heads_key} that divides {size} (e.g. {', '.join(map(str, divisors))})."
        )


def _llama_shape(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The shape settings a Llama is built with: its weights directory's config.json, else the config's own keys."""
    if cfg.get("pretrained"):
        # `_build_llama` takes the shape of pretrained weights from their config.json and ignores the other keys.
        path = os.path.join(_pretrained_dir(cfg["pretrained"]), "config.json")
        if not os.path.isfile(path):
            raise MissingPathError(f"model.pretrained={str(cfg['pretrained'])!r} has no config.json; it is not a "
                                   "Hugging Face model directory.")
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    defaults = _transformers().LlamaConfig()  # a plain config object: no weights
    keys = ("vocab_size", "max_position_embeddings", "hidden_size", "num_attention_heads", "num_key_value_heads",
            "head_dim")
    return {k: cfg.get(k, None if k == "head_dim" else getattr(defaults, k, None)) for k in keys}


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
    except (TypeError, ValueError) as err:
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
