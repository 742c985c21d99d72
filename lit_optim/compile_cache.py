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

_configured: str | None = None


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


def configure_compile_cache() -> str | None:
    """Point inductor's on-disk caches at a persistent directory; return the directory in effect (None: left alone).

    Idempotent and cheap (it compiles nothing, so building an optimizer stays free of compile cost). Inductor reads
    the variable on every compile, so compiles after this call use the directory even if earlier ones did not.
    """
    global _configured
    user_dir = os.environ.get(INDUCTOR_ENV)
    if user_dir and user_dir != _configured and not _is_torch_default(user_dir):
        return user_dir  # the user's choice (or one made by a launcher): never overridden
    if _configured is not None:
        return _configured
    switch = os.environ.get(SWITCH_ENV, "").strip()
    if switch.lower() in _OFF:
        return None
    path = Path(switch).expanduser() if switch else default_cache_dir()
    if not _usable(path):
        # A read-only home (some clusters) must not stop training: PyTorch's /tmp default still works within a run.
        log.warning("lit_optim: compile cache directory %s is not writable; using PyTorch's default", path)
        return None
    _configured = str(path.resolve())
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
