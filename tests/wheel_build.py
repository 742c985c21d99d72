"""Build lit_optim's wheel once per test session, and install it into a throwaway virtual environment.

The wheel is built from a copy of the checkout (git's tracked and untracked-but-not-ignored files), so the build
leaves nothing behind in the working tree and sees exactly what a clean checkout would. The environment shares this
interpreter's site-packages (torch, Hydra, ...) but has its own lit_optim, so code run there uses the *installed*
package -- including the Hydra plugin, which an editable install does not expose outside the repository.

"This interpreter's site-packages" are the ones it imports from: inside a virtual environment, the environment's own.
(`venv`'s ``system_site_packages=True`` would give the *base* interpreter's instead, which in a virtual environment
lacks torch and Hydra.) A ``.pth`` file in the new environment adds them with `site.addsitedir`, after its own
site-packages, and their ``.pth`` files are processed as at start-up.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_CACHE: dict[str, Path] = {}


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _checkout_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout
    return [f for f in out.decode().split("\0") if f and (REPO / f).exists()]


def copy_checkout(dest: Path) -> Path:
    """The checkout's files (symlinks kept as links) under `dest`."""
    for rel in _checkout_files():
        src, dst = REPO / rel, dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(src.readlink())
        elif src.is_file():
            shutil.copy2(src, dst)
    return dest


def build_requirements_problem() -> str | None:
    """Why this interpreter cannot build the wheel offline (pyproject's build requirements, no index), or None.

    A fresh virtual environment carries the setuptools its Python was shipped with (65 for 3.11), older than the
    build needs; building with isolation would need the network.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("setuptools")
    except PackageNotFoundError:
        return "setuptools is not installed here"
    if tuple(int(x) for x in found.split(".")[:2] if x.isdigit()) < (69, 0):
        return f"setuptools {found} is older than the build's setuptools>=69 (pip install -U setuptools wheel)"
    if importlib.util.find_spec("wheel") is None:
        return "the wheel package is not installed here (pip install wheel)"
    return None


def build_wheel(workdir: Path) -> Path:
    """The path of lit_optim's wheel, built (once per session) under `workdir`."""
    problem = build_requirements_problem()
    if problem:
        import pytest

        pytest.skip(f"cannot build lit_optim's wheel offline in this environment: {problem}")
    if "wheel" not in _CACHE:
        src = copy_checkout(workdir / "src")
        dist = workdir / "dist"
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
              "-w", str(dist), str(src)])
        (wheel,) = dist.glob("lit_optim-*.whl")
        _CACHE["wheel"] = wheel
    return _CACHE["wheel"]


def site_dirs() -> list[str]:
    """The site-packages directories this interpreter imports from (a virtual environment's own when in one)."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def make_env(env_dir: Path) -> Path:
    """A new virtual environment that sees this interpreter's packages after its own; returns its python."""
    venv.EnvBuilder(system_site_packages=False, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    own = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    adds = "; ".join(f"site.addsitedir({d!r})" for d in site_dirs())
    (Path(own) / "_lit_optim_test_parent_site.pth").write_text(f"import site; {adds}\n")
    return python


def installed_env(workdir: Path) -> Path:
    """A virtual environment's python with the wheel installed (dependencies from this interpreter's environment)."""
    if "python" not in _CACHE:
        wheel = build_wheel(workdir)
        python = make_env(workdir / "venv")
        _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
              str(wheel)])
        _CACHE["python"] = python
    return _CACHE["python"]


def editable_env(workdir: Path) -> Path:
    """A virtual environment's python with a copy of the checkout installed as the README's set-up does it:
    `pip install -e .` (setuptools' default editable mode, whose packages Hydra's plugin scan cannot see)."""
    if "editable_python" not in _CACHE:
        src = copy_checkout(workdir / "src")
        python = make_env(workdir / "venv")
        _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-build-isolation",
              "--no-index", "-q", "-e", str(src)])
        _CACHE["editable_python"] = python
    return _CACHE["editable_python"]
