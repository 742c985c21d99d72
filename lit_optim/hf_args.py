"""`from_hf_training_args`: a Hugging Face `TrainingArguments` -> the lit_optim optimizer config its Trainer means.

The oracle is transformers' `Trainer.get_optimizer_cls_and_kwargs` (transformers/trainer_optimizer.py) plus
`create_optimizer`'s two param groups (``args.weight_decay`` on the decay group, 0.0 on the rest). For each name this
module passes what that handler passes, read from the same attributes, so ``build_optimizer(model, **cfg)`` builds the
same optimizer (tests/test_hf_parity.py checks it against transformers itself). transformers is not imported: any
object with the attributes works.

Where the Trainer passes ``optim_args`` values through as strings or ignores them, this module converts them to the
types the optimizer takes, and refuses keys the Trainer would drop for that name: a silently ignored setting is the
kind of difference this module exists to remove.
"""

from __future__ import annotations

from typing import Any

from lit_optim.errors import HyperparameterError, LitOptimError
from lit_optim.hf_names import HF_TRAINER_NAMES
from lit_optim.registry import get_spec

_TRUE, _FALSE = {"true", "1", "yes", "y", "on", "t"}, {"false", "0", "no", "n", "off", "f"}


def _bool(value: str) -> bool:
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _optional_float(value: str) -> float | None:
    return None if str(value).strip().lower() == "none" else float(value)


def parse_optim_args(optim_args: str | dict | None) -> dict[str, str]:
    """``"k=v,k=v"`` as the Trainer parses it (blanks removed, one ``=`` per item)."""
    if not optim_args:
        return {}
    if isinstance(optim_args, dict):
        return {str(k): str(v) for k, v in optim_args.items()}
    parsed = {}
    for item in str(optim_args).replace(" ", "").split(","):
        key, sep, value = item.partition("=")
        if not sep or not key or "=" in value:
            raise HyperparameterError(f"optim_args item {item!r} is not key=value (optim_args={optim_args!r}).")
        parsed[key] = value
    return parsed


# Per Hugging Face name family: the optim_args keys its Trainer handler reads, with the type each becomes, and the
# lit_optim hyperparameter it sets. weight_decay in optim_args is absent on purpose: the Trainer's param groups carry
# args.weight_decay and override it.
_F, _I, _B, _S = float, int, _bool, str
_OPTIM_ARGS: dict[str, dict[str, Any]] = {
    "sgd": {"momentum": _F, "dampening": _F, "nesterov": _B},
    "adagrad": {"lr_decay": _F, "eps": _F},
    "rmsprop": {"momentum": _F, "alpha": _F, "eps": _F, "centered": _B},
    "rmsprop_bnb": {"momentum": _F, "alpha": _F, "eps": _F, "centered": _B},
    "torchao": {"block_size": _I, "bf16_stochastic_round": _B},
    "schedule_free": {"weight_lr_power": _F, "r": _F},
    "stable_adamw": {"decouple_lr": _B, "max_lr": _optional_float, "kahan_sum": _B},
    "galore": {"rank": _I, "update_proj_gap": _I, "scale": _F, "proj_type": _S},
    "apollo": {"rank": _I, "update_proj_gap": _I, "scale": _F, "proj_type": _S, "scale_type": _S, "proj": _S},
    "ademamix": {"beta1": _F, "beta2": _F, "beta3": _F, "alpha": _F, "eps": _F, "t_alpha": _I, "t_beta3": _I},
}


def _family(name: str) -> str:
    if name.startswith("galore_"):
        return "galore"
    if name.startswith("apollo_"):
        return "apollo"
    if name.startswith("schedule_free_"):
        return "schedule_free"
    if name in ("adamw_torch_4bit", "adamw_torch_8bit"):
        return "torchao"
    if name.startswith("rmsprop_bnb"):
        return "rmsprop_bnb"
    if "ademamix" in name:
        return "ademamix"
    if name in ("adamw_torch", "adamw_torch_fused", "adafactor", "lomo", "adalomo", "stable_adamw", "sgd", "adagrad",
                "rmsprop"):
        return name
    if "lion" in name:
        return "lion"
    return "bnb_adamw"  # adamw_bnb_8bit, adamw_8bit, paged_adamw_8bit, paged_adamw_32bit


def _typed_optim_args(name: str, family: str, raw: dict[str, str]) -> dict[str, Any]:
    known = _OPTIM_ARGS.get(family, {})
    unknown = sorted(set(raw) - set(known))
    if unknown:
        takes = ", ".join(sorted(known)) or "none"
        raise HyperparameterError(
            f"optim_args key(s) {unknown} are not used by Hugging Face's Trainer for optim={name!r} (it would ignore "
            f"them). Keys it reads for this name: {takes}."
        )
    typed = {}
    for key, value in raw.items():
        try:
            typed[key] = known[key](value)
        except ValueError as err:
            raise HyperparameterError(f"optim_args {key}={value!r} for optim={name!r}: {err}") from None
    return typed


def from_hf_training_args(args: Any) -> dict[str, Any]:
    """The lit_optim optimizer config (``{"name": ..., "lr": ..., ...}``) for a `TrainingArguments`.

    Reads ``optim``, ``learning_rate``, ``adam_beta1``, ``adam_beta2``, ``adam_epsilon``, ``weight_decay``,
    ``optim_args`` and ``optim_target_modules`` (and ``warmup_steps`` for schedule-free AdamW/SGD, as the Trainer
    does). Use it as ``build_optimizer(model, **cfg)`` or ``OptimizerMixin(optim=cfg)``.
    """
    name = str(getattr(args.optim, "value", args.optim)).strip().lower()
    if name not in HF_TRAINER_NAMES:
        raise HyperparameterError(
            f"optim={name!r} is not a Hugging Face Trainer optimizer name; from_hf_training_args translates those "
            "only. For a lit_optim name, pass {'name': ..., 'lr': ...} to build_optimizer directly."
        )
    try:
        get_spec(name)
    except LitOptimError as err:
        raise HyperparameterError(f"Hugging Face optim={name!r} has no lit_optim equivalent: {err}") from None

    family = _family(name)
    extra = _typed_optim_args(name, family, parse_optim_args(getattr(args, "optim_args", None)))
    b1, b2, eps = float(args.adam_beta1), float(args.adam_beta2), float(args.adam_epsilon)
    adam = {"betas": (b1, b2), "eps": eps}
    cfg: dict[str, Any] = {"name": name, "lr": float(args.learning_rate), "weight_decay": float(args.weight_decay)}

    if family in ("adamw_torch", "adamw_torch_fused", "bnb_adamw", "stable_adamw"):
        cfg.update(adam)
    elif family == "lion":
        cfg["betas"] = (b1, b2)  # the Trainer passes no eps to Lion
    elif family == "torchao":
        cfg.update(adam, block_size=256, bf16_stochastic_round=False)
    elif family == "ademamix":
        cfg["betas"] = (extra.pop("beta1", b1), extra.pop("beta2", b2), extra.pop("beta3", 0.9999))
        cfg["alpha"] = extra.pop("alpha", 5.0)
        cfg["eps"] = extra.pop("eps", eps)
    elif family == "schedule_free":
        if name != "schedule_free_sgd":
            cfg.update(adam)
        if name != "schedule_free_radam":
            cfg["warmup_steps"] = getattr(args, "warmup_steps", 0) or 0
        cfg.update(weight_lr_power=2.0, r=0.0)
    elif family in ("galore", "apollo"):
        targets = getattr(args, "optim_target_modules", None)
        if targets is None:
            raise HyperparameterError(
                f"optim={name!r} needs optim_target_modules (a list of names, a regex or 'all-linear'), as "
                "Hugging Face's Trainer does."
            )
        cfg["target_modules"] = targets
        if family == "apollo":
            cfg.update(adam)
            proj = extra.pop("proj", "random")
            if proj != "random":
                raise HyperparameterError(
                    f"optim_args proj={proj!r}: lit_optim's APOLLO uses random projections only ('random')."
                )
    cfg.update(extra)
    return cfg
