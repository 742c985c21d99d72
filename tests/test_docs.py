"""The README's optimizer table and test command stay true to the code."""

from __future__ import annotations

import re
from pathlib import Path

from lit_optim import docs

ROOT = Path(__file__).resolve().parent.parent


def test_readme_optimizer_table_matches_registry():
    text = (ROOT / "README.md").read_text()
    assert docs.render_readme(text) == text, "README table is stale: run `python -m lit_optim.docs`"


def test_readme_table_lists_every_name():
    import lit_optim

    text = (ROOT / "README.md").read_text()
    for name in lit_optim.list_optimizers():
        assert f"| `{name}`" in text


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- ci:test -->\s*```bash\n(.+?)\n```\s*<!-- /ci:test -->", readme, re.S)
    assert block and "pytest" in block.group(1)
    assert "ci:test" in (ROOT / ".ci" / "run").read_text()


# --- every shell command and Python snippet of the README, run at small size -------------------------------------

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)

# Commands this file does not run, by their first words, and why.
NOT_RUN = {
    ("pip", "install"): "installs packages from an index (.ci/run runs the set-up on CI)",
    ("pip", "wheel"): "builds the wheel: tests/test_packaging.py builds it the same way (tests/wheel_build.py)",
    ("python", "-m", "pytest"): "the test suite itself",
    ("ruff", "check"): "CI's test command (test_ci_runs_the_readme_test_command checks that CI runs it)",
    ("python", "train.py"): "the LightningCLI example: tests/test_lightning_cli.py::test_readme_lightning_cli_example",
}
# Python blocks, by a line they contain, and the test that executes them.
PYTHON_BLOCKS = {
    "optimizer = lit_optim.build_optimizer(model, **cfg.optim)": "test_readme_hydra_app_after_an_editable_install",
    "def configure_model(self):": "test_readme_python_snippets_run",
    'lit_optim.build_optimizer(model, "galore_adamw"': "test_readme_python_snippets_run",
    "LitOptimCLI(Regressor)": "tests/test_lightning_cli.py::test_readme_lightning_cli_example",
    'fabric.load("run.ckpt", resumed)': "test_readme_fabric_example_runs",
}
# The run directory the README's resume example continues (made by the command just before it).
README_RUN_DIR = "outputs/2026-12-06/07-08-26"
# Overrides that shrink every `lit-optim train` of the README to a couple of CPU steps (a value the command sets is
# replaced, so e.g. trainer.max_steps=100 runs 2 steps).
SMALL = {
    "trainer.max_steps": "2", "trainer.accelerator": "cpu", "trainer.val_check_interval": "2",
    "trainer.limit_val_batches": "1", "trainer.log_every_n_steps": "1", "trainer.enable_progress_bar": "false",
    "data.train_tokens": "16384", "data.val_tokens": "2048",
}


def readme_blocks() -> list[tuple[int, str, str]]:
    """(line number, language, text) of each fenced block of the README."""
    text = (ROOT / "README.md").read_text()
    return [(text[:m.start()].count("\n") + 1, m.group(1), m.group(2)) for m in FENCE.finditer(text)]


def shell_commands(block: str) -> list[list[str]]:
    """The commands of a shell block, as argument lists: comments dropped, `a && b` split in two."""
    import shlex

    commands = []
    for line in block.splitlines():
        words, current = shlex.split(line, comments=True), []
        for word in [*words, "&&"]:
            if word == "&&":
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(word)
    return commands


def not_run_reason(command: list[str]) -> str | None:
    return next((why for prefix, why in NOT_RUN.items() if tuple(command[:len(prefix)]) == prefix), None)


def readme_lit_optim_commands() -> list[list[str]]:
    out = []
    for _, lang, block in readme_blocks():
        if lang in ("bash", "sh", "shell"):
            out.extend(c for c in shell_commands(block) if c[0] == "lit-optim")
    return out


def shrunk(args: list[str], index: int) -> list[str]:
    """`lit-optim` arguments (without the program name) at small size, each run in its own directory."""
    if args[0] not in ("train", "compare"):
        return args
    key = lambda arg: arg.split("=", 1)[0].lstrip("+~")  # noqa: E731
    small = dict(SMALL)
    out = [f"{key(a)}={small.pop(key(a))}" if "=" in a and key(a) in small else a for a in args]
    out += [f"{k}={v}" for k, v in small.items()]
    if args[0] == "compare":  # it puts each run under its own output directory
        return [*out, "--out", f"run{index}"]
    where = "hydra.sweep.dir" if "-m" in args or "--multirun" in args else "hydra.run.dir"
    return [*out, f"{where}=run{index}"]


def test_every_readme_block_is_run_or_listed():
    """A new bash or python block in the README must be run by a test here, or listed above with the reason."""
    unlisted = []
    for line, lang, block in readme_blocks():
        if lang in ("bash", "sh", "shell"):
            for command in shell_commands(block):
                if command[0] != "lit-optim" and not not_run_reason(command):
                    unlisted.append(f"README.md:{line}: {' '.join(command)}")
        elif lang == "python":
            if not any(marker in block for marker in PYTHON_BLOCKS):
                unlisted.append(f"README.md:{line}: python block starting {block.splitlines()[0]!r}")
        elif lang not in ("yaml", "diff"):
            # The yaml block runs with its python block. The diff shows an edit to a user's module, not code to run
            # (tests/test_mixin.py runs a module written that way).
            unlisted.append(f"README.md:{line}: a ```{lang} block")
    assert not unlisted, "run these in tests/test_docs.py, or list them in NOT_RUN/PYTHON_BLOCKS:\n" + "\n".join(
        unlisted)
    assert len(readme_lit_optim_commands()) >= 15


def test_readme_commands_run_at_small_size(tmp_path):
    """Every `lit-optim` command of the README, as written plus SMALL, in one process: each one succeeds, each
    training prints its summary, and the sweep gives one directory and one W&B run per optimizer."""
    import json
    import os
    import subprocess
    import sys

    from lit_optim.wandb_offline import OfflineRun

    commands = [shrunk(c[1:], i) for i, c in enumerate(readme_lit_optim_commands())]
    # The resume example names the run directory the command before it made; here that is its run<index>.
    for i, args in enumerate(commands):
        commands[i] = [a.replace(f"={README_RUN_DIR}", f"=run{i - 1}") for a in args]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "readme_commands.py"), json.dumps(commands)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    results = {r["index"]: r for r in (json.loads(line[7:]) for line in proc.stdout.splitlines()
                                       if line.startswith("RESULT "))}
    outputs = re.split(r"^@@ \d+$", proc.stdout, flags=re.M)[1:]
    failed = [f"lit-optim {' '.join(commands[i])}: {results.get(i)}" for i in range(len(commands))
              if results.get(i, {}).get("status") != 0]
    assert not failed, "\n".join(failed) + "\n" + proc.stderr[-4000:]
    for i, args in enumerate(commands):
        if args[0] == "train":
            jobs = [a for a in args if a.startswith("optim=")] or ["one"]
            sweep = len(jobs[0].split(",")) if "-m" in args else 1
            assert outputs[i].count("lit-optim: finished") == sweep, (args, outputs[i][-3000:])
        elif args[0] == "compare":  # every run succeeded and the table was printed, one row per optimizer
            names = next(a for a in args if a.startswith("optim=")).split("=", 1)[1].split(",")
            assert all(f"{name}: ok in" in outputs[i] for name in names), (args, outputs[i][-3000:])
            assert all(f"| `{name}` | ok |" in outputs[i] for name in names), (args, outputs[i][-3000:])

    # The sweep: one directory per optimizer, named after it, each with its own W&B run.
    (sweep,) = [(i, a) for i, a in enumerate(commands) if "-m" in a]
    names = next(a for a in sweep[1] if a.startswith("optim=")).split("=", 1)[1].split(",")
    jobs = {d.name: d for d in (tmp_path / f"run{sweep[0]}").iterdir() if d.is_dir()}
    assert len(jobs) == len(names)
    for name in names:
        (job,) = [d for n, d in jobs.items() if f"optim={name}," in n + ","]
        (wandb_file,) = job.rglob("run-*.wandb")
        run = OfflineRun.read(wandb_file)
        assert run.config["optim"]["name"] == name and run.name == job.name


def test_readme_python_snippets_run():
    """The big-model module and the GaLore/in-backward lines, executed as written on the built-in tiny model."""
    import lightning as L
    import torch

    from lit_optim import OptimizerMixin
    from lit_optim.task.models import build_model

    tiny = {"arch": "tiny", "vocab_size": 64, "d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 16}
    blocks = {marker: block for _, lang, block in readme_blocks() if lang == "python"
              for marker in PYTHON_BLOCKS if marker in block}

    scope = {"OptimizerMixin": OptimizerMixin, "L": L, "build": build_model}
    exec(blocks["def configure_model(self):"], scope)
    module = scope["LitLM"](tiny, optim={"name": "adamw_torch", "lr": 1e-3})
    assert module.model is None
    module.configure_model()
    assert isinstance(module.model, torch.nn.Module) and sum(p.numel() for p in module.parameters()) > 0

    built = []
    for line in blocks['lit_optim.build_optimizer(model, "galore_adamw"'].splitlines():
        scope = {"lit_optim": __import__("lit_optim"), "model": build_model(tiny)}
        exec(line, scope)
        built.append(type(scope["opt"]).__name__)
    assert built == ["GaLore", "GaLore", "InBackwardOptimizer"]


def test_readme_fabric_example_runs(tmp_path, monkeypatch):
    """The Fabric section's example, as written: it trains, saves, loads and asserts the exact resume itself; its
    checkpoint needs no class registered to load."""
    import torch

    (block,) = [b for _, lang, b in readme_blocks() if lang == "python" and 'fabric.load("run.ckpt", resumed)' in b]
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "readme_fabric"}
    exec(compile(block, "README.md (Fabric)", "exec"), scope)
    assert scope["run"]["step"] == scope["resumed"]["step"] == 20
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / "run.ckpt")) == []
    assert torch.load(tmp_path / "run.ckpt", weights_only=True)["step"] == 10


APP = """
import hydra, torch, lit_optim

@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64))  # 4096 elements: 8-bit state
    scope = {"lit_optim": lit_optim, "model": model, "cfg": cfg}
    exec(SNIPPET, scope)
    optimizer = scope["optimizer"]
    print("BUILT", type(optimizer).__module__ + "." + type(optimizer).__name__, lit_optim.__file__)

main()
"""


def test_readme_hydra_app_after_an_editable_install(tmp_path):
    """The README's Hydra-app config and line, in an app of its own, run with the README's own set-up: an editable
    install (`pip install -e .`), where Hydra cannot see lit_optim's search-path plugin."""
    import os
    import subprocess

    import wheel_build

    python = wheel_build.editable_env(tmp_path / "editable")
    blocks = readme_blocks()
    i = next(i for i, (_, lang, b) in enumerate(blocks) if lang == "python" and "**cfg.optim" in b)
    (_, yaml_lang, yaml_block), (_, _, snippet) = blocks[i - 1], blocks[i]
    assert yaml_lang == "yaml" and "optim: adamw_8bit" in yaml_block
    (tmp_path / "app" / "conf").mkdir(parents=True)
    (tmp_path / "app" / "conf" / "config.yaml").write_text(yaml_block)
    (tmp_path / "app" / "my_app.py").write_text(f"SNIPPET = {snippet!r}\n{APP}")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(python), "my_app.py"], cwd=tmp_path / "app", env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("BUILT ")]
    _, cls, where = line.split()
    assert cls == "bitsandbytes.optim.adamw.AdamW8bit"
    assert Path(where).is_relative_to(tmp_path / "editable" / "src")  # the editable install's, not this checkout's


def test_readme_adoption_diff_applied_trains():
    """The README's adoption diff, applied (the `+` and unchanged lines), defines a module that is made at the call
    site the diff shows and trains with the optimizer and schedule named there."""
    import lightning as L
    import torch

    from lit_optim import OptimizerMixin

    (diff,) = [block for _, lang, block in readme_blocks() if lang == "diff"]
    after = "\n".join(line[1:] for line in diff.splitlines() if line[:1] in ("+", " ") or line == "")
    scope = {"L": L, "torch": torch, "OptimizerMixin": OptimizerMixin, "cfg": 16,
             "build": lambda width: torch.nn.Linear(width, width)}
    exec(after.replace("from lit_optim import OptimizerMixin", ""), scope)
    model = scope["model"]
    model.training_step = lambda batch, batch_idx=0: model.model(batch[0]).square().mean()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 16)), batch_size=8)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    assert trainer.global_step == 2
    assert type(trainer.optimizers[0]).__name__ == "PagedAdamW8bit"
    assert trainer.lr_scheduler_configs, "the schedule named at the call site"


def test_readme_support_matrix_matches_the_code():
    from lit_optim.support_matrix import matrix_table

    text = (ROOT / "README.md").read_text()
    block = text.split(docs.MATRIX_START, 1)[1].split(docs.MATRIX_END, 1)[0]
    assert block.strip() == matrix_table(), "README support matrix is stale: run `python -m lit_optim.docs`"
