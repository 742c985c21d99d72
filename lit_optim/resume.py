"""Resuming a run: which checkpoint, and whether it can resume this run -- found out before step 1.

    lit-optim train resume=outputs/2026-12-06/07-08-26 trainer.max_steps=600   # that run's config and last checkpoint
    lit-optim train ckpt_path=last                                           # the newest earlier run's last.ckpt
    lit-optim train 'ckpt_path="outputs/.../checkpoints/epoch=0-step=300.ckpt"'  # one file ('=' needs quotes)

``resume=<run dir>`` composes the run's own overrides (its ``.hydra/overrides.yaml``) followed by the ones given now,
which win key by key, so the run continues with the config it was started with unless told otherwise. The resumed run
gets a directory of its own, as every Hydra run does; the earlier one is left as it was. Its checkpoint is the newest
``last*.ckpt`` of the earlier run (else its newest ``*.ckpt``); ``ckpt_path=<file>`` picks another.

``ckpt_path=last`` looks in this run's checkpoint directory first (Lightning's meaning), then in the earlier runs next
to this one (Hydra's ``outputs/<date>/<time>`` layout); with none anywhere it trains from scratch, as Lightning does.

A checkpoint is opened once here, memory-mapped (tensors are not read), to check that it exists, is a file, loads,
and was written with the same optimizer; the module checks the model's shapes against it when Lightning loads it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lit_optim.errors import IncompatibleConfigError, LitOptimError, MissingPathError

log = logging.getLogger("lit_optim")

RESUME_KEY = "resume"
RECORD_KEY = "lit_optim"  # checkpoint["lit_optim"] = {"optimizer": <registry name>}, written by OptimizerLifecycle
_PLAIN_VALUE = re.compile(r"[\w/.\-+:@~]+")
_DATE_DIR = re.compile(r"\d{4}-\d{2}-\d{2}")


# --- resume=<run dir>: the earlier run's overrides, then these ---------------------------------------------------


def _parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(overrides)


def _quote(value: str) -> str:
    if _PLAIN_VALUE.fullmatch(value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def expand_resume(argv: list[str]) -> list[str]:
    """Command-line arguments with ``resume=<run dir>`` expanded into that run's overrides (given ones win).

    Idempotent (Lightning's DDP launcher re-runs the command line in every other rank): overrides already present
    are not added again.
    """
    overrides = [a for a in argv if not a.startswith("-") and ("=" in a or a.startswith("~"))]
    try:
        parsed = _parse(overrides)
    except Exception:  # noqa: BLE001 - Hydra reports the malformed override itself, with its grammar
        return argv
    resume = [(arg, o) for arg, o in zip(overrides, parsed) if o.key_or_group == RESUME_KEY and o.value()]
    if not resume:
        return argv
    arg, override = resume[-1]
    run_dir = find_run_dir(str(override.value()))
    saved = _saved_overrides(run_dir)
    given = {o.key_or_group for o in parsed}
    kept = [s for s, o in zip(saved, _parse(saved))
            if o.key_or_group not in given and o.key_or_group not in (RESUME_KEY, "ckpt_path")]
    prefix = "+" * (len(arg) - len(arg.lstrip("+")))
    expanded = [f"{prefix}{RESUME_KEY}={_quote(str(run_dir))}" if a == arg else a for a in argv]
    if kept:
        log.debug("resume=%s: adding the run's own overrides %s", run_dir, kept)
    return [*kept, *expanded]


def find_run_dir(value: str) -> Path:
    run_dir = Path(os.path.expanduser(value)).resolve()
    if not run_dir.is_dir():
        raise MissingPathError(
            f"resume={value} is not a directory. Give the run directory of an earlier `lit-optim train` "
            "(e.g. outputs/<date>/<time>), or ckpt_path=<file> to start from one checkpoint."
        )
    if not (run_dir / ".hydra" / "overrides.yaml").is_file():
        raise MissingPathError(
            f"resume={value} has no .hydra/overrides.yaml: it is not the directory of a `lit-optim train` run "
            "(outputs/<date>/<time>). Give one, or ckpt_path=<file> to start from a checkpoint of your own."
        )
    return run_dir


def _saved_overrides(run_dir: Path) -> list[str]:
    from omegaconf import OmegaConf

    saved = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "overrides.yaml"))
    return [str(s) for s in saved or []]


# --- which checkpoint ----------------------------------------------------------------------------------------------


def newest_checkpoint(directory: Path, last_only: bool = False) -> Path | None:
    """The newest ``last*.ckpt`` in `directory`, else (unless `last_only`) its newest ``*.ckpt``."""
    if not directory.is_dir():
        return None
    for pattern in ("last*.ckpt",) if last_only else ("last*.ckpt", "*.ckpt"):
        found = [p for p in directory.glob(pattern) if p.is_file()]
        if found:
            return max(found, key=lambda p: p.stat().st_mtime)
    return None


def _checkpoint_subdirs(output_dir: Path, checkpoint_dirs: list[str]) -> tuple[list[str], list[Path]]:
    """This run's checkpoint directories: relative to the run directory where they are inside it, else absolute."""
    relative, absolute = [], []
    for d in checkpoint_dirs:
        rel = os.path.relpath(os.path.abspath(d), output_dir)
        (absolute.append(Path(d)) if rel.startswith("..") else relative.append(rel))
    return relative, absolute


def resume_checkpoint(run_dir: Path, output_dir: Path, checkpoint_dirs: list[str]) -> Path:
    """The checkpoint `resume=<run dir>` continues from: the newest last checkpoint of that run."""
    relative, absolute = _checkpoint_subdirs(output_dir, checkpoint_dirs)
    candidates = [run_dir / r for r in relative] + absolute
    for directory in candidates:
        found = newest_checkpoint(directory)
        if found:
            return found
    anywhere = [p for p in run_dir.rglob("*.ckpt") if p.is_file()]
    if anywhere:
        return max(anywhere, key=lambda p: p.stat().st_mtime)
    raise MissingPathError(
        f"resume={run_dir}: that run wrote no checkpoint (looked in {', '.join(map(str, candidates or [run_dir]))}). "
        "Resume a run that saved one (callbacks.checkpoint.every_n_train_steps sets how often), or start afresh "
        "without resume."
    )


def last_checkpoint(output_dir: Path, checkpoint_dirs: list[str]) -> Path | None:
    """`ckpt_path=last`: this run's last checkpoint, else the newest last checkpoint of an earlier run next to it."""
    relative, absolute = _checkpoint_subdirs(output_dir, checkpoint_dirs)
    own = [newest_checkpoint(output_dir / r, last_only=True) for r in relative]
    own += [newest_checkpoint(d, last_only=True) for d in absolute]
    own = [p for p in own if p]
    if own:
        return max(own, key=lambda p: p.stat().st_mtime)
    # Earlier runs: siblings of this run directory, and with Hydra's outputs/<date>/<time> layout, other dates too.
    patterns = [f"*/{r}" for r in relative]
    roots = [output_dir.parent]
    if _DATE_DIR.fullmatch(output_dir.parent.name):
        roots.append(output_dir.parent.parent)
        patterns += [f"*/*/{r}" for r in relative]
    found = []
    for root, pattern in ((root, p) for root in roots for p in patterns):
        for directory in root.glob(pattern):
            if directory.resolve() != output_dir.resolve() and not directory.resolve().is_relative_to(output_dir):
                found.append(newest_checkpoint(directory, last_only=True))
    found = [p for p in found if p]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


# --- whether it can resume this run -------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike, key: str = "ckpt_path") -> dict[str, Any]:
    """Open a checkpoint memory-mapped (its tensors are not read) and say clearly why it cannot be used, if not."""
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise MissingPathError(
            f"{key}={path} does not exist (relative paths are taken from the directory you ran in). Give an existing "
            "checkpoint file, or resume=<run dir> to continue a run from its last checkpoint."
        )
    if p.is_dir():
        if is_sharded_checkpoint(p):
            # torch.distributed.checkpoint's directory (FSDP2, or FSDP1's sharded): the strategy loads it (check_ranks)
            return {}
        raise MissingPathError(f"{key}={path} is a directory. Give a checkpoint file in it (e.g. {p / 'last.ckpt'}), "
                               "or resume=<run dir> to continue that run from its last checkpoint.")
    try:
        return _load(p)
    except LitOptimError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever torch says about a damaged file, the fix is the same
        reason = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else type(err).__name__
        raise MissingPathError(
            f"{key}={path} is not a loadable checkpoint ({reason[:200]}): it is truncated (a run killed while "
            "writing it) or not a torch checkpoint. Use another checkpoint of the run, e.g. an earlier step's."
        ) from None


def is_sharded_checkpoint(path: Path) -> bool:
    """A torch.distributed.checkpoint directory, as Lightning's ModelParallelStrategy (FSDP2) saves, and its
    FSDPStrategy (FSDP1) with state_dict_type="sharded"."""
    return path.is_dir() and (path / ".metadata").is_file()


def check_ranks(path: str | os.PathLike, world_size: int, key: str = "ckpt_path") -> None:
    """Refuse, before the strategy loads it, a sharded checkpoint whose lit_optim low-bit state was written by
    another number of ranks: its codes are quantized block by block within each rank's shard (see
    lit_optim.optimizers.lowbit), so they cannot be resharded; torch.distributed.checkpoint would stop deep in the
    load with a size mismatch."""
    p = Path(os.path.expanduser(str(path)))
    if not is_sharded_checkpoint(p):
        return
    from torch.distributed.checkpoint import FileSystemReader

    for name, meta in FileSystemReader(str(p)).read_metadata().state_dict_metadata.items():
        size = getattr(meta, "size", None)
        # The fused optimizers save every code and scale buffer as a (ranks, length) DTensor, one row a rank.
        if name.endswith("exp_avg_scale") and size is not None and len(size) == 2 and size[0] != world_size:
            raise IncompatibleConfigError(
                f"{key}={path} holds lit_optim low-bit optimizer state sharded over {size[0]} ranks (FSDP2), but "
                f"this run has {world_size}: the codes were quantized block by block within each rank's shard and "
                f"cannot be resharded exactly. Resume on {size[0]} ranks (trainer.devices x trainer.num_nodes), or "
                "start a new run from the weights alone."
            )


def _load(path: Path) -> dict[str, Any]:
    def load(mmap: bool):
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)

    try:
        checkpoint = load(mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        checkpoint = load(mmap=False)  # the pre-zip format: small (old) files only, read whole
    except pickle.UnpicklingError:
        # torchao's state classes are safe to load once `torchao.optim` has registered them; Lightning's own load
        # (also weights_only) needs the same. Anything else it refuses is refused there as well.
        if importlib.util.find_spec("torchao") is None:
            raise
        import torchao.optim  # noqa: F401

        checkpoint = load(mmap=True)
    if not isinstance(checkpoint, dict):
        raise MissingPathError(f"ckpt_path={path} holds a {type(checkpoint).__name__}, not a Lightning checkpoint.")
    return checkpoint


def recorded_optimizer(checkpoint: Mapping[str, Any]) -> str | None:
    """The optimizer name a checkpoint was written with: lit_optim's own record, else the module's hyperparameters."""
    record = checkpoint.get(RECORD_KEY)
    if isinstance(record, Mapping) and isinstance(record.get("optimizer"), str):
        return record["optimizer"]
    optim = (checkpoint.get("hyper_parameters") or {}).get("optim")
    if isinstance(optim, str):
        return optim
    if isinstance(optim, Mapping) and isinstance(optim.get("name"), str):
        return optim["name"]
    return None


def canonical_name(name: str) -> str:
    from lit_optim.registry import get_spec

    try:
        return get_spec(name).name
    except LitOptimError:
        return name


def check_optimizer(checkpoint: Mapping[str, Any], name: str, path: Any) -> None:
    """Refuse optimizer state from another optimizer: it loads, then the first step fails (e.g. KeyError 'state1')."""
    saved = recorded_optimizer(checkpoint)
    if saved is None or not checkpoint.get("optimizer_states"):
        return
    if canonical_name(saved) != canonical_name(name):
        raise IncompatibleConfigError(
            f"ckpt_path={path} was written with optimizer {saved!r} but this run uses {name!r}: one's state cannot "
            f"be loaded into the other. Resume with optim={saved}, or start a new run (no ckpt_path/resume) to "
            f"switch optimizers."
        )


def check_model(checkpoint: Mapping[str, Any], module: torch.nn.Module, path: Any, strict: bool = True) -> None:
    """Refuse a checkpoint of another model shape with the first difference, before Lightning's long traceback."""
    saved = checkpoint.get("state_dict")
    if not isinstance(saved, Mapping):
        return
    own = module.state_dict()
    diffs = [f"{k} is {list(saved[k].shape)} there but {list(v.shape)} here" for k, v in own.items()
             if k in saved and hasattr(saved[k], "shape") and hasattr(v, "shape")
             and tuple(saved[k].shape) != tuple(v.shape)]
    if strict:
        diffs += [f"{k} is missing there" for k in own if k not in saved]
        diffs += [f"{k} is only there" for k in saved if k not in own]
    if diffs:
        more = f" (and {len(diffs) - 1} more differences)" if len(diffs) > 1 else ""
        raise IncompatibleConfigError(
            f"ckpt_path={path} holds another model than this run builds: {diffs[0]}{more}. Resume with the model "
            f"settings it was trained with (a lit-optim run's are in its .hydra/config.yaml), or start a new run "
            f"without ckpt_path/resume."
        )
