"""Run one configuration once per optimizer, each in its own `lit-optim train` process, and compare them.

One process per optimizer, one after another: memory peaks do not mix (PyTorch's caching allocator and bitsandbytes'
paged buffers keep what an earlier run took), and "launch to step 1" includes the imports, the model build and
compilation each run really pays. Every run gets the same overrides, then ``optim=<name>`` (after a recipe, so it
wins), its own directory ``<out>/runs/<name>/``, and the `ComparisonRecorder` callback.

Logging: CSV unless the overrides name a logger. With ``logger=wandb`` the runs share the W&B group
``<out directory name>`` and are named after their optimizers; with every logger the comparison is read from a CSV
(`ComparisonRecorder` adds one next to a non-CSV logger). Checkpoints are off unless the overrides mention
``callbacks.checkpoint`` (an 8B model's is tens of GB per run, and writing it would count as training time).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from lit_optim.comparison import plots, table
from lit_optim.comparison.rows import Row, read_row
from lit_optim.errors import HyperparameterError, IncompatibleConfigError
from lit_optim.run_metrics import failure_reason

RECORDER = "lit_optim.comparison.recorder.ComparisonRecorder"


@dataclass
class Comparison:
    """What `compare` wrote: ``path`` (the output directory), ``table`` (Markdown, as printed), ``rows``."""

    path: Path
    table: str
    rows: list[Row]
    files: list[Path] = field(default_factory=list)

    def __str__(self) -> str:
        return self.table


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def check_request(optims: Sequence[str], overrides: Sequence[str]) -> list[str]:
    """The optimizers as registry names, checked before anything runs; the overrides must leave what compare sets."""
    from lit_optim.registry import get_spec

    if isinstance(optims, str):
        optims = [o for o in optims.split(",") if o]
    if not optims:
        raise HyperparameterError("compare needs optimizers to compare, e.g. optim=adamw_torch,adamw_8bit "
                                  "(`lit-optim list` shows the names).")
    for name in optims:
        get_spec(name)  # an unknown name is refused with its close matches
    duplicates = sorted({n for n in optims if list(optims).count(n) > 1})
    if duplicates:
        raise HyperparameterError(f"compare got {', '.join(duplicates)} more than once: name each optimizer once.")
    for override in overrides:
        key = _key(override)
        if override in ("-m", "--multirun"):
            raise IncompatibleConfigError("compare runs one process per optimizer itself: drop -m.")
        if key == "optim":
            raise HyperparameterError(f"{override!r}: give the optimizers once, as optim=a,b,c on the command line "
                                      "(optims=[...] in Python); optim.<setting>=... applies to all of them.")
        if key in ("hydra.run.dir", "hydra.sweep.dir", "output_dir"):
            raise IncompatibleConfigError(f"{override!r}: compare puts each run in <out>/runs/<optimizer>; "
                                          "choose the output directory with --out DIR (out= in Python).")
    return list(optims)


def _quoted(value: str) -> str:
    # Hydra's override grammar: a quoted value is taken as a plain string (paths may hold '=', ',' or spaces).
    return "'" + value.replace("'", "\\'") + "'"


def run_overrides(name: str, overrides: Sequence[str], run_dir: Path, group: str) -> list[str]:
    """The `lit-optim train` overrides of one run: the shared ones, then what compare sets."""
    keys = {_key(o) for o in overrides}
    logger = next((o.split("=", 1)[1] for o in overrides if _key(o) == "logger"), None)
    out = list(overrides)
    if logger is None:
        out.append("logger=csv")
        logger = "csv"
    if logger == "csv":
        out.append("++logger.flush_logs_every_n_steps=1")  # a run that fails half-way still shows how far it got
    elif logger == "wandb":
        out += [f"++logger.group={_quoted(group)}", f"++logger.name={_quoted(name)}"]
    if not any(k == "callbacks.checkpoint" or k.startswith("callbacks.checkpoint.") for k in keys):
        out.append("++callbacks.checkpoint=null")
    if "trainer.enable_progress_bar" not in keys:
        out.append("trainer.enable_progress_bar=false")  # the output goes to a file
    if "trainer.log_every_n_steps" not in keys:
        out.append("trainer.log_every_n_steps=1")  # every step's loss for the curves, short runs included
    return [*out, f"+callbacks.comparison_recorder._target_={RECORDER}", f"optim={name}",
            f"hydra.run.dir={_quoted(str(run_dir))}"]


def default_out() -> Path:
    return Path("compare") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def _run_budget(run_dir: Path) -> float | None:
    """max_device_memory_gib as the run's composed config has it (a recipe may set it)."""
    try:
        from omegaconf import OmegaConf

        value = OmegaConf.load(run_dir / ".hydra" / "config.yaml").get("max_device_memory_gib")
        return float(value) if value is not None else None
    except Exception:  # noqa: BLE001 - no config (the run stopped before Hydra wrote it) or an unreadable value
        return None


def _run(cmd: list[str], log_path: Path, env: dict[str, str], timeout_s: float | None) -> tuple[int, str | None]:
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            return proc.wait(timeout=timeout_s), None
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(), f"timed out after {timeout_s:g} s (--timeout)"
        except KeyboardInterrupt:
            proc.kill()
            proc.wait()
            raise


def _done_line(row: Row) -> str:
    if not row.ok:
        return f"failed in {row.seconds:.0f} s (exit {row.exit_code}): {row.reason}"
    facts = [f"final loss {row.final_loss:.4g}" if row.final_loss is not None else None,
             f"val loss {row.val_loss:.4g}" if row.val_loss is not None else None,
             f"{row.tokens_per_s:,.0f} tokens/s" if row.tokens_per_s is not None else None]
    return f"ok in {row.seconds:.0f} s" + (f": {', '.join(f for f in facts if f)}" if any(facts) else "")


def compare(optims: Sequence[str], overrides: Sequence[str] = (), out: str | Path | None = None,
            budget_gib: float | None = None, timeout_s: float | None = None,
            echo: Callable[[str], None] | None = print) -> Comparison:
    """Train the configuration `overrides` (any `lit-optim train` overrides, e.g. ``recipe=llama31_8b``) once per
    optimizer in `optims`, one process each, and write the comparison into `out` (default
    ``compare/<date>_<time>``): ``comparison.md``, ``comparison.csv``, PNG plots (with matplotlib) and ``runs/``.

    A run that fails is a row with its reason. `budget_gib` (or ``max_device_memory_gib`` in the overrides or the
    recipe) adds a fits-in-budget column. `echo` gets the progress lines and the table (None: quiet).
    """
    say = echo or (lambda line: None)
    optims = check_request(optims, overrides)
    out = Path(out) if out is not None else default_out()
    if (out / "comparison.md").exists() or (out / "runs").exists():
        raise IncompatibleConfigError(f"{out} already holds a comparison: choose another --out directory.")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rows: list[Row] = []
    for i, name in enumerate(optims, 1):
        run_dir = out / "runs" / name
        run_dir.mkdir()
        log_path = run_dir / "output.log"
        cmd = [sys.executable, "-m", "lit_optim.cli", "train", *run_overrides(name, overrides, run_dir, out.name)]
        say(f"[{i}/{len(optims)}] {name}: running ({_shown(log_path)})")
        start = time.perf_counter()
        code, timed_out = _run(cmd, log_path, env, timeout_s)
        reason = timed_out or failure_reason(log_path.read_text(errors="replace"), code)
        row = read_row(name, run_dir, code, reason, time.perf_counter() - start,
                       float(budget_gib) if budget_gib is not None else _run_budget(run_dir))
        rows.append(row)
        say(f"[{i}/{len(optims)}] {name}: {_done_line(row)}")
    markdown = table.markdown(rows)
    (out / "comparison.md").write_text(markdown + "\n")
    (out / "comparison.csv").write_text(table.csv_text(rows))
    files = [out / "comparison.md", out / "comparison.csv", *plots.write_plots(rows, out)]
    say("\n" + markdown + "\n")
    shown = ", ".join(p.name for p in files)
    say(f"comparison: {_shown(out)} ({shown})" + ("" if plots.have_matplotlib() else f"\n{plots.NO_MATPLOTLIB}"))
    return Comparison(path=out, table=markdown, rows=rows, files=files)


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it is under it (shorter to copy), else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
