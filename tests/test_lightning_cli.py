"""LightningCLI as a way in: `--model.optim.*` options and YAML select any registry optimizer with typed values, a
bare name works, mistakes and LightningCLI's own `--optimizer`/`--lr_scheduler` are refused before the model is
built, and the README's LightningCLI example runs as written (each of its commands, at two steps).

Everything runs in this process (`args=[...]`); only the fits take a Trainer past construction.
"""

from __future__ import annotations

import re
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader, TensorDataset

import lit_optim.lightning_cli as lightning_cli
from lit_optim import OptimizerMixin, build_optimizer
from lit_optim.errors import HyperparameterError, IncompatibleConfigError
from lit_optim.lightning_cli import LitOptimCLI, OptimConfig, SchedulerConfig, yaml_value

QUIET = ["--trainer.accelerator=cpu", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
         "--trainer.enable_model_summary=false", "--trainer.enable_checkpointing=false", "--seed_everything=0"]


class Typed(OptimizerMixin, L.LightningModule):
    built = 0

    def __init__(self, hidden: int = 64, optim: OptimConfig = "adamw_torch", scheduler: SchedulerConfig = None):
        super().__init__(optim=optim, scheduler=scheduler)
        Typed.built += 1
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.LayerNorm(hidden))

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).square().mean()

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(16, 64)), batch_size=4)


class Untyped(Typed):
    # The README's mixin signature: no annotations.
    def __init__(self, optim="adamw_torch", scheduler=None):
        super().__init__(optim=optim, scheduler=scheduler)


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    # LightningCLI warns when both `args` and sys.argv carry arguments.
    monkeypatch.setattr(sys, "argv", ["train.py"])


def parse(*args: str, cli=LitOptimCLI, model=Typed, **kw):
    return cli(model, run=False, args=[*args, *QUIET], **kw)


def built(cli) -> torch.optim.Optimizer:
    """What the module's configure_optimizers builds (its schedule needs a fitting Trainer: left out here)."""
    cfg = dict(cli.model.optim_config)
    return build_optimizer(cli.model, cfg.pop("name"), **cfg)


def test_yaml_value_reads_strings_with_yaml_rules():
    assert yaml_value("2e-5") == 2e-5 and isinstance(yaml_value("2e-5"), float)
    assert yaml_value("1E3") == 1000.0 and isinstance(yaml_value("1E3"), float)
    assert yaml_value("5") == 5 and isinstance(yaml_value("5"), int)
    assert yaml_value("[0.9, 2e-3]") == [0.9, 2e-3]
    assert yaml_value("true") is True and yaml_value("null") is None
    assert yaml_value("all-linear") == "all-linear"
    assert yaml_value("{embedding: 1e-1}") == {"embedding": 0.1}
    assert yaml_value("[unclosed") == "[unclosed"


@pytest.mark.parametrize("cli", [LitOptimCLI, LightningCLI], ids=["LitOptimCLI", "LightningCLI"])
def test_dotted_options_build_the_named_optimizer_with_typed_values(cli):
    """The annotations alone make the dotted form typed, under LitOptimCLI and a plain LightningCLI."""
    run = parse("--model.optim.name=adamw_8bit", "--model.optim.lr=2e-5", "--model.optim.betas=[0.9,0.95]",
                "--model.optim.eps=1e-7", "--model.optim.amsgrad=false", "--model.optim.weight_decay=0.1", cli=cli)
    cfg = run.model.optim_config
    assert cfg == {"name": "adamw_8bit", "lr": 2e-5, "betas": (0.9, 0.95), "eps": 1e-7, "amsgrad": False,
                   "weight_decay": 0.1}
    assert type(cfg["lr"]) is float and type(cfg["amsgrad"]) is bool
    opt = built(run)
    assert f"{type(opt).__module__}.{type(opt).__name__}".startswith("bitsandbytes.optim.")
    assert type(opt).__name__ == "AdamW8bit" and opt.lit_optim.name == "adamw_bnb_8bit"
    group = opt.param_groups[0]
    assert group["lr"] == 2e-5 and type(group["lr"]) is float
    assert group["betas"] == (0.9, 0.95) and group["eps"] == 1e-7 and group["weight_decay"] in (0.1, 0.0)
    assert run.model.hparams.optim["lr"] == 2e-5


def test_yaml_mapping_and_dotted_override_and_scheduler(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  optim:\n    name: adamw_8bit\n    lr: 2e-5\n    betas: [0.8, 0.9]\n"
                      "  scheduler: {name: cosine, warmup_steps: 2}\n")
    run = parse(f"--config={config}")
    assert run.model.optim_config == {"name": "adamw_8bit", "lr": 2e-5, "betas": (0.8, 0.9)}
    assert run.model.scheduler_config == {"name": "cosine", "warmup_steps": 2}
    assert type(built(run)).__name__ == "AdamW8bit"
    # Options after the config add to its mapping: the YAML's name and betas stay.
    run = parse(f"--config={config}", "--model.optim.lr=3e-4", "--model.scheduler.warmup_steps=5")
    assert run.model.optim_config == {"name": "adamw_8bit", "lr": 3e-4, "betas": (0.8, 0.9)}
    assert run.model.scheduler_config == {"name": "cosine", "warmup_steps": 5}


def test_a_bare_name_is_a_mapping_that_later_options_add_to(tmp_path):
    run = parse("--model.optim=adamw_8bit")
    assert run.model.optim_config == {"name": "adamw_8bit"}
    assert type(built(run)).__name__ == "AdamW8bit"

    run = parse("--model.optim=sgd", "--model.optim.lr=0.1", "--model.optim.momentum=0.9", "--model.scheduler=linear")
    assert run.model.optim_config == {"name": "sgd", "lr": 0.1, "momentum": 0.9}
    assert run.model.scheduler_config == {"name": "linear"}
    opt = built(run)
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["momentum"] == 0.9

    # A YAML bare name, then an option; and options alone add to the signature's default name.
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  optim: lion_8bit\n")
    assert parse(f"--config={config}", "--model.optim.lr=1e-4").model.optim_config == {"name": "lion_8bit",
                                                                                         "lr": 1e-4}
    assert parse("--model.optim.lr=1e-3").model.optim_config == {"name": "adamw_torch", "lr": 1e-3}
    # A mapping value, as the README writes it.
    run = parse("--model.optim.lr_scales={embedding: 0.1}")
    assert run.model.optim_config == {"name": "adamw_torch", "lr_scales": {"embedding": 0.1}}


def refusal(capsys, *args: str, model=Typed) -> str:
    """The one line a refused command prints, after checking it exits with status 2 before the model is built."""
    before = Typed.built
    with pytest.raises(SystemExit) as exit_info:
        parse(*args, model=model)
    assert exit_info.value.code == 2
    assert Typed.built == before, "the model was built before the refusal"
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-1500:]
    return lines[0]


def test_unknown_hyperparameters_and_names_are_refused_with_lit_optims_message(capsys):
    line = refusal(capsys, "--model.optim.name=adamw_8bit", "--model.optim.lrr=1e-3")
    assert line.startswith("error: Optimizer 'adamw_bnb_8bit' (bitsandbytes.optim.AdamW8bit) does not take "
                           "hyperparameter 'lrr'. Did you mean lr?")
    assert "Unknown optimizer 'adamw_9bit'" in refusal(capsys, "--model.optim=adamw_9bit")
    assert "hyperparameter betas=0.9 has the wrong type" in refusal(capsys, "--model.optim.betas=0.9")
    assert "Unknown LR schedule 'cosin'" in refusal(capsys, "--model.scheduler=cosin")
    assert "does not take ['warmup']" in refusal(capsys, "--model.scheduler=cosine", "--model.scheduler.warmup=3")
    # With exit_on_error off, the lit_optim error itself.
    with pytest.raises(HyperparameterError, match="does not take hyperparameter 'lrr'"):
        parse("--model.optim.lrr=1", parser_kwargs={"exit_on_error": False})


def test_lightning_cli_optimizer_and_lr_scheduler_are_refused_with_the_fix(capsys, tmp_path):
    # The full class path: once bitsandbytes is imported, jsonargparse finds two classes named AdamW.
    line = refusal(capsys, "--optimizer=torch.optim.AdamW", "--optimizer.lr=0.01")
    assert line == ("error: --optimizer would replace the optimizer lit_optim builds for Typed (OptimizerMixin); "
                    "select it with --model.optim.name=adamw_torch --model.optim.lr=0.01 "
                    "--model.optim.weight_decay=0.01 instead, and drop --optimizer.")
    line = refusal(capsys, "--optimizer=torch.optim.Rprop")  # no registry name builds it: the general form
    assert "select it with --model.optim.name=<registry name> --model.optim.<hyperparameter>=<value>" in line
    line = refusal(capsys, "--lr_scheduler=StepLR", "--lr_scheduler.step_size=3")
    assert line.startswith("error: --lr_scheduler would replace the LR schedule lit_optim builds for Typed")
    assert "--model.scheduler.name=cosine|linear|constant" in line
    config = tmp_path / "config.yaml"  # the same from a config file
    config.write_text("optimizer:\n  class_path: torch.optim.SGD\n  init_args: {lr: 0.1}\n")
    assert "--model.optim.name=sgd --model.optim.lr=0.1 instead" in refusal(capsys, f"--config={config}")
    with pytest.raises(IncompatibleConfigError, match="--optimizer would replace"):
        parse("--optimizer=torch.optim.AdamW", parser_kwargs={"exit_on_error": False})


def test_an_untyped_optim_parameter_says_to_annotate_it(capsys):
    line = refusal(capsys, "--model.optim.name=adamw_8bit", "--model.optim.lr=1e-3", model=Untyped)
    assert "annotate it `optim: OptimConfig = \"adamw_torch\"`" in line
    assert "a bare schedule name needs `scheduler: SchedulerConfig = None`" in refusal(
        capsys, "--model.scheduler=cosine", model=Untyped)
    # What works without the annotation: a bare name, and a whole mapping at once.
    assert parse("--model.optim=adamw_8bit", model=Untyped).model.optim_config == {"name": "adamw_8bit"}
    run = parse("--model.optim={name: sgd, lr: 0.5}", "--model.scheduler={name: cosine}", model=Untyped)
    assert run.model.optim_config == {"name": "sgd", "lr": 0.5}
    assert run.model.scheduler_config == {"name": "cosine"}


def test_a_two_step_fit_through_the_cli(tmp_path):
    run = LitOptimCLI(Typed, args=["fit", "--model.optim.name=adamw_8bit", "--model.optim.lr=1e-2",
                                   "--model.scheduler=cosine", "--model.scheduler.warmup_steps=1",
                                   "--trainer.max_steps=2", f"--trainer.default_root_dir={tmp_path}", *QUIET])
    assert run.trainer.global_step == 2
    (opt,) = run.trainer.optimizers
    assert type(opt).__name__ == "AdamW8bit" and opt.lit_optim.name == "adamw_bnb_8bit"
    assert run.trainer.lr_scheduler_configs[0].scheduler.last_epoch == 2
    assert (tmp_path / "config.yaml").read_text().count("name: adamw_8bit") == 1


# --- the README's LightningCLI section, run as written ------------------------------------------------------------

SMALL = ["--trainer.max_steps=2", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
         "--trainer.enable_model_summary=false", "--trainer.logger=false", "--trainer.enable_checkpointing=false"]


def readme_section() -> tuple[str, str, list[list[str]]]:
    """The LightningCLI section's module, config and `python train.py` commands."""
    from test_docs import readme_blocks, shell_commands

    blocks = readme_blocks()
    (i,) = [i for i, (_, lang, b) in enumerate(blocks) if lang == "python" and "LitOptimCLI(Regressor)" in b]
    (_, yaml_lang, config), (_, bash_lang, bash) = blocks[i + 1], blocks[i + 2]
    assert yaml_lang == "yaml" and bash_lang == "bash" and config.startswith("# config.yaml")
    commands = shell_commands(bash)
    assert commands and all(c[:2] == ["python", "train.py"] for c in commands)
    return blocks[i][2], config, commands


def test_readme_lightning_cli_example(tmp_path, monkeypatch, capsys):
    """train.py as the README writes it, run as `python train.py ...` for each README command (plus SMALL: two CPU
    steps), in this process: each fit takes two steps with the optimizer and values the command names."""
    module, config, commands = readme_section()
    (tmp_path / "config.yaml").write_text(config)
    monkeypatch.chdir(tmp_path)
    runs = []

    class Recorded(LitOptimCLI):
        def after_instantiate_classes(self):
            super().after_instantiate_classes()
            runs.append(self)

    monkeypatch.setattr(lightning_cli, "LitOptimCLI", Recorded)
    for index, command in enumerate(commands):
        monkeypatch.setattr(sys, "argv", [*command[1:], *SMALL, f"--trainer.default_root_dir=run{index}"])
        try:
            exec(compile(module, "train.py", "exec"), {"__name__": "__main__"})
        except SystemExit as exit_info:  # --print_config prints and exits
            assert "--print_config" in command and exit_info.code in (0, None), command
    fits = [c for c in commands if "--print_config" not in c]
    assert len(runs) == len(fits)

    expected = [  # per fit command: optimizer class, lit_optim name, learning rate after the command's options
        ("AdamW8bit", "adamw_bnb_8bit", {"lr": 2e-5, "betas": (0.9, 0.95)}),
        ("Lion8bit", "lion_8bit", {}),
        ("AdamW8bit", "adamw_bnb_8bit", {"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.01}),
    ]
    assert len(expected) == len(fits)
    for run, (cls, name, values) in zip(runs, expected):
        assert run.trainer.global_step == 2
        (opt,) = run.trainer.optimizers
        assert (type(opt).__name__, opt.lit_optim.name) == (cls, name)
        assert {k: run.model.optim_config[k] for k in values} == values
    assert runs[1].model.scheduler_config == {"name": "cosine", "warmup_steps": 10}
    assert runs[2].model.scheduler_config == {"name": "cosine", "warmup_ratio": 0.1}

    printed = capsys.readouterr().out
    assert re.search(r"^  optim:\n    name: paged_adamw_8bit$", printed, re.M), printed[-2000:]
