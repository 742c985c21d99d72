"""LightningCLI for modules with `OptimizerMixin`: any registry optimizer and its hyperparameters from the command
line or a YAML config, typed, and a refusal of LightningCLI's own ``--optimizer``/``--lr_scheduler``.

    from lit_optim.lightning_cli import LitOptimCLI, OptimConfig, SchedulerConfig

    class MyModule(OptimizerMixin, L.LightningModule):
        def __init__(self, optim: OptimConfig = "adamw_torch", scheduler: SchedulerConfig = None):
            super().__init__(optim=optim, scheduler=scheduler)

    LitOptimCLI(MyModule)      # python train.py fit --model.optim.name=adamw_8bit --model.optim.lr=2e-5

The two annotations are what jsonargparse (LightningCLI's parser) reads from the signature. With them:

- ``--model.optim=adamw_8bit`` (a bare name) is stored as ``{"name": "adamw_8bit"}``, so the signature's default
  and a YAML ``optim: adamw_8bit`` are mappings too, and a later ``--model.optim.lr=...`` adds to them instead of
  replacing the name;
- ``--model.optim.<key>=<value>`` values are read with YAML rules (``2e-5`` and ``1e-3`` are numbers as well):
  ``--model.optim.betas=[0.9,0.95]`` is a list, ``--model.optim.amsgrad=true`` a boolean, ``all-linear`` a string;
- a YAML ``optim:`` mapping (``{name: adamw_8bit, lr: 2.0e-5}``) is taken as it is.

Without the annotation (``optim="adamw_torch"``) jsonargparse accepts ``--model.optim=<name>`` and a YAML mapping but
not the dotted form; `LitOptimCLI` says so. The annotations work under a plain `LightningCLI` too; `LitOptimCLI` adds
the checks of `LitOptimCLI.before_instantiate_classes`, before the model is built.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from typing import Any, NoReturn

from jsonargparse import Namespace
from jsonargparse.typing import register_type
from lightning.pytorch.cli import LightningCLI

from lit_optim.build import _plain, check_available, resolve_hyperparameters
from lit_optim.errors import HyperparameterError, IncompatibleConfigError, LitOptimError
from lit_optim.mixin import OptimizerMixin, normalize_optim_config
from lit_optim.registry import all_specs, get_spec


class Hyperparameter:
    """One value of an `OptimConfig`/`SchedulerConfig` mapping, read with YAML rules when it arrives as a string."""


class ByName(dict):
    """A bare name (``--model.optim=adamw_8bit``), stored as the mapping ``{"name": ...}``."""


# Numbers YAML 1.1 leaves as strings: exponents without a dot (2e-5, 1E3) and a dot without digits after it (5.).
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")


def yaml_value(value: Any) -> Any:
    """`value` with every string in it read as YAML (``"2e-5"`` -> 2e-05, ``"[0.9, 0.95]"`` -> [0.9, 0.95],
    ``"true"`` -> True, ``"null"`` -> None, ``"all-linear"`` stays a string); mappings and lists are walked."""
    import yaml

    if isinstance(value, Mapping):
        return {k: yaml_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [yaml_value(v) for v in value]
    if not isinstance(value, str):
        return value
    if _NUMBER.fullmatch(value.strip()):
        return float(value) if re.search(r"[.eE]", value) else int(value)
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    return value if isinstance(parsed, str) else yaml_value(parsed)


def _by_name(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        return {"name": value}
    raise ValueError(f"expected a name, got {value!r}")


# type_check: never "already a Hyperparameter", so every value goes through yaml_value; serialized as it is.
register_type(Hyperparameter, serializer=lambda v: v, deserializer=yaml_value, type_check=lambda v, t: False)
register_type(ByName, serializer=lambda v: v, deserializer=_by_name, type_check=lambda v, t: False)

#: Annotate a LightningModule's ``optim`` parameter with this: a registry name, or a mapping with ``name`` and the
#: name's hyperparameters (``lit-optim describe <name>`` lists them).
OptimConfig = dict[str, Hyperparameter] | ByName | None
#: Annotate ``scheduler`` with this: ``None`` (constant LR), a schedule name, or ``{name, warmup_steps |
#: warmup_ratio, min_lr_ratio}``.
SchedulerConfig = dict[str, Hyperparameter] | ByName | None

FIX = "--model.optim.name=<registry name> --model.optim.<hyperparameter>=<value>"


class LitOptimCLI(LightningCLI):
    """`LightningCLI` for modules built on `OptimizerMixin`; use it where you would use `LightningCLI`.

    Before the model is built (so a mistake costs no model construction) it refuses, in one line:

    - ``--optimizer``/``--lr_scheduler`` (and their YAML keys): LightningCLI would replace the module's
      ``configure_optimizers`` -- lit_optim's optimizer, param groups and schedule -- with its own, and the saved
      hyperparameters would still name the lit_optim one. The message names the ``--model.optim.*`` equivalent;
    - an ``optim``/``scheduler`` that lit_optim would refuse when the module is built: unknown name or
      hyperparameter, wrong type, backend missing (the same messages as the mixin's);
    - a dotted ``--model.optim.<key>`` on a module whose ``optim`` parameter is not annotated with `OptimConfig`.

    With jsonargparse's ``exit_on_error`` (the default) a refusal prints ``error: <message>`` and exits with status
    2, as a command-line error does; with ``parser_kwargs={"exit_on_error": False}`` it raises the lit_optim error.
    """

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        config = self.config.get(str(self.subcommand), self.config)
        module = self._module_class(config)
        if module is None or not issubclass(module, OptimizerMixin):
            return
        init = config.model.get("init_args", config.model) if self.subclass_mode_model else config.model
        if not isinstance(init, Namespace):
            return
        try:
            self._refuse_lightning_optimizer(config, module, init)
            self._check_optim(init, module)
            self._check_scheduler(init)
        except LitOptimError as error:
            self._refuse(error)

    def _module_class(self, config: Namespace) -> type | None:
        if self.subclass_mode_model:
            class_path = config.get("model", {}).get("class_path") if isinstance(config.get("model"), Namespace) \
                else None
            if not class_path:
                return None
            import importlib

            module_name, _, name = str(class_path).rpartition(".")
            found = getattr(importlib.import_module(module_name), name, None) if module_name else None
        else:
            found = self.model_class
        return found if isinstance(found, type) else None

    def _refuse_lightning_optimizer(self, config: Namespace, module: type, init: Namespace) -> None:
        optimizer, scheduler = config.get("optimizer"), config.get("lr_scheduler")
        if optimizer:
            fix = _equivalent(optimizer) or FIX
            raise IncompatibleConfigError(
                f"--optimizer would replace the optimizer lit_optim builds for {module.__name__} (OptimizerMixin); "
                f"select it with {fix} instead, and drop --optimizer.")
        if scheduler:
            fix = ("--model.scheduler.name=cosine|linear|constant --model.scheduler.warmup_steps=<n>"
                   if "scheduler" in init else "OptimizerMixin's scheduler argument (e.g. {'name': 'cosine'})")
            raise IncompatibleConfigError(
                f"--lr_scheduler would replace the LR schedule lit_optim builds for {module.__name__} "
                f"(OptimizerMixin); use {fix} instead, and drop --lr_scheduler.")

    def _check_optim(self, init: Namespace, module: type) -> None:
        if "optim" not in init:
            return
        optim = init.optim
        if type(optim).__name__ == "NestedArg":  # jsonargparse's value for --model.optim.<key> on an untyped `optim`
            raise HyperparameterError(
                f"{module.__name__}.__init__'s `optim` parameter has no type, so --model.optim.<key> options cannot be "
                "read: annotate it `optim: OptimConfig = \"adamw_torch\"` (from lit_optim.lightning_cli import "
                "OptimConfig), or give the whole optimizer at once (--model.optim=<name>, or an optim: mapping in the "
                "config).")
        if isinstance(optim, Namespace):
            optim = optim.as_dict()
        if isinstance(optim, Mapping) and "name" not in optim:
            optim = {"name": "adamw_torch", **optim}  # what the mixin builds for optim=None
            init.optim = optim
        cfg = normalize_optim_config(optim)
        spec = get_spec(cfg.pop("name"))
        check_available(spec)
        resolve_hyperparameters(spec, cfg)

    def _check_scheduler(self, init: Namespace) -> None:
        scheduler = init.get("scheduler")
        if scheduler is None or type(scheduler).__name__ == "NestedArg":
            return  # not given; or untyped, where the mixin refuses it
        if isinstance(scheduler, Namespace):
            scheduler = scheduler.as_dict()
        if isinstance(scheduler, str):  # SchedulerConfig makes a name a mapping: this `scheduler` has no type
            raise HyperparameterError(
                f"scheduler={scheduler!r}: a bare schedule name needs `scheduler: SchedulerConfig = None` in the "
                "module's __init__ (from lit_optim.lightning_cli import SchedulerConfig); or give a mapping "
                f"(--model.scheduler='{{name: {scheduler}}}').")
        if not isinstance(scheduler, Mapping):
            raise HyperparameterError(f"scheduler must be a mapping like {{'name': 'cosine'}}; got {scheduler!r}.")
        import torch

        from lit_optim.scheduler import build_scheduler

        try:  # every check of the schedule's settings, on a stand-in optimizer
            build_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), _plain(scheduler), 100)
        except (TypeError, ValueError) as error:
            if isinstance(error, LitOptimError):
                raise
            raise HyperparameterError(f"scheduler {dict(scheduler)!r}: {error}") from error

    def _refuse(self, error: LitOptimError) -> NoReturn:
        parser = self._parser(self.subcommand)
        if not getattr(parser, "exit_on_error", True):
            raise error
        sys.stderr.write(f"error: {error}\n")
        raise SystemExit(2)


def _init_args(optimizer: Any) -> dict[str, Any]:
    args = optimizer.get("init_args") if isinstance(optimizer, (Mapping, Namespace)) else None
    if isinstance(args, Namespace):
        args = args.as_dict()
    return dict(args or {})


def _cli_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_cli_value(v) for v in value) + "]"
    return str(value)


def _equivalent(optimizer: Any) -> str | None:
    """The ``--model.optim.*`` options that build what ``--optimizer`` asked for (``--optimizer=AdamW
    --optimizer.lr=0.01`` -> ``--model.optim.name=adamw_torch --model.optim.lr=0.01 ...``), if a registry name
    builds that class as it is."""
    import importlib
    import inspect

    class_path = optimizer.get("class_path") if isinstance(optimizer, (Mapping, Namespace)) else optimizer
    if not isinstance(class_path, str):
        return None
    module, _, name = class_path.rpartition(".")
    for spec in all_specs():
        target_module, _, target_name = spec.target.partition(":")
        # jsonargparse may name the defining module (torch.optim.adamw.AdamW), under the target's.
        in_module = module == "" or module == target_module or module.startswith(target_module + ".")
        if target_name != name or not in_module or spec.fixed:
            continue
        try:
            cls = getattr(importlib.import_module(module or target_module), name)
            params = inspect.signature(cls).parameters
        except (ImportError, AttributeError, TypeError, ValueError):
            params = {}
        options = [f"--model.optim.name={spec.name}"]
        for key, value in _init_args(optimizer).items():
            default = params[key].default if key in params else inspect.Parameter.empty
            if value != spec.defaults.get(key, default):
                options.append(f"--model.optim.{key}={_cli_value(value)}")
        return " ".join(options)
    return None
