"""A persistent compile cache for optimizers whose step is `torch.compile`d (torchao's low-bit Adam family).

torchao compiles its per-parameter step once per distinct (shape, dtype, state type) signature: 37-43 s on the
first step of an 8B Llama on an H200, in every fresh process. Nothing in that graph differs between runs, and
PyTorch's caches (AOTAutograd cache + FX graph cache, Triton kernels bundled in) do hit for torchao's tensor-subclass
graphs -- but they live under ``$TMPDIR/torchinductor_$USER`` by default, which containers, job schedulers and
fresh machines throw away, so "every run" is a cold compile. Pointing inductor at a per-user directory that
survives turns every run after the first into a cache load (CPU: 37 s -> 3.7 s for six shapes; see
benchmarks/first_step.py for the GPU numbers).

A user's own ``TORCHINDUCTOR_CACHE_DIR`` always wins; ``LIT_OPTIM_COMPILE_CACHE=0`` leaves PyTorch's default alone;
``LIT_OPTIM_COMPILE_CACHE=<dir>`` picks the directory. Setting the variable is process-wide on purpose: inductor reads
it on every compile, and a model compiled in the same process profits from the same persistence.

One rank of a distributed job (an initialized process group, else the launcher's ``RANK``/``WORLD_SIZE``) gets its own
subdirectory, ``rank{R}-of-{W}``: under FSDP2 torchao compiles its step on DTensors, and the AOTAutograd cache keys a
DTensor by its global metadata (mesh, placements, global shape), not by the rank's shard, so ranks sharing a directory
were handed graphs compiled for another rank's shard size. A rank's shard shapes follow from (rank, world size), so
one directory per pair is reused safely run after run. (lit_optim/builders/torchao_shards.py also keeps that cache
out of DTensor steps, for a directory the user shares between ranks.)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("lit_optim")

INDUCTOR_ENV = "TORCHINDUCTOR_CACHE_DIR"
SWITCH_ENV = "LIT_OPTIM_COMPILE_CACHE"
_OFF = {"0", "off", "false", "no", "none"}

_configured: str | None = None  # the directory lit_optim put in the environment
_configured_base: Path | None = None  # the directory it was chosen under (without the rank subdirectory)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lit_optim/inductor`` (``~/.cache/lit_optim/inductor``): per user, outside ``/tmp``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lit_optim" / "inductor"


def _is_torch_default(path: str) -> bool:
    # Importing torch._dynamo writes PyTorch's default (/tmp/torchinductor_$USER) into the environment, so a value
    # equal to that default says nothing about the user's wishes (and naming the default explicitly changes nothing).
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default

    return os.path.abspath(path) == os.path.abspath(torch_default())


def _usable(path: Path) -> bool:
    try:
        # 0o700: compiled artifacts are loaded and executed; another user must not be able to plant them.
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return os.access(path, os.W_OK | os.X_OK)
    except OSError:
        return False


def rank_subdir() -> str | None:
    """``rank{R}-of-{W}`` when this process is one of several ranks (W > 1), else None.

    The process group is asked when it is initialized (Lightning builds optimizers after that); otherwise the
    launcher's ``RANK`` and ``WORLD_SIZE`` (torchrun), so a cache configured before the group exists is per rank too.
    """
    world = rank = None
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            world, rank = dist.get_world_size(), dist.get_rank()
    except Exception:  # noqa: BLE001 - a broken distributed package must not stop a single-process build
        pass
    if world is None:
        try:
            world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        except (KeyError, ValueError):
            return None
    return f"rank{rank}-of-{world}" if world > 1 else None


def configure_compile_cache() -> str | None:
    """Point inductor's on-disk caches at a persistent directory; return the directory in effect (None: left alone).

    Idempotent and cheap (it compiles nothing, so building an optimizer stays free of compile cost). Inductor reads
    the variable on every compile, so compiles after this call use the directory even if earlier ones did not. The
    base directory is chosen once per process; a rank subdirectory is added (or changed) when the process turns out to
    be one rank of several.
    """
    global _configured, _configured_base
    user_dir = os.environ.get(INDUCTOR_ENV)
    if user_dir and user_dir != _configured and not _is_torch_default(user_dir):
        return user_dir  # the user's choice (or one made by a launcher): never overridden
    if _configured is not None and _configured_base is not None:
        base = _configured_base
    else:
        switch = os.environ.get(SWITCH_ENV, "").strip()
        if switch.lower() in _OFF:
            return None
        base = Path(switch).expanduser() if switch else default_cache_dir()
    sub = rank_subdir()
    path = base / sub if sub else base
    if _configured is not None and str(path.resolve()) == _configured:
        return _configured
    if not _usable(path):
        # A read-only home (some clusters) must not stop training: PyTorch's /tmp default still works within a run.
        log.warning("lit_optim: compile cache directory %s is not writable; using PyTorch's default", path)
        if _configured is not None and os.environ.get(INDUCTOR_ENV) == _configured:
            os.environ.pop(INDUCTOR_ENV)  # never leave a rank in a directory chosen for another
        _configured = _configured_base = None
        return None
    _configured, _configured_base = str(path.resolve()), base
    os.environ[INDUCTOR_ENV] = _configured
    # The AOTAutograd and FX graph caches are on by default; they are only reported here, never forced on, so that
    # a user who turned them off (TORCHINDUCTOR_FX_GRAPH_CACHE=0, force_disable_caches) keeps that choice.
    log.info("lit_optim: torch.compile cache in %s (set %s to choose another)", _configured, INDUCTOR_ENV)
    return _configured


def _torchao_name(name: Any) -> bool:
    if not isinstance(name, str):
        return False
    from lit_optim.registry import get_spec

    try:
        return get_spec(name).backend == "torchao"
    except Exception:  # noqa: BLE001 - an unknown inner name is reported by the inner build, not here
        return False


def compiles_step(spec: Any, hyperparameters: Mapping[str, Any] | None = None) -> bool:
    """Whether building `spec` yields a step that torch.compiles: a torchao optimizer, or a wrapper around one."""
    if spec.backend == "torchao":
        return True
    inner = (hyperparameters or {}).get("inner", spec.fixed.get("inner"))
    return _torchao_name(inner)


def prepare_for(spec: Any, hyperparameters: Mapping[str, Any] | None = None) -> str | None:
    """Called by `build_optimizer`: configure the persistent cache only when this optimizer compiles its step."""
    if compiles_step(spec, hyperparameters):
        return configure_compile_cache()
    return None
