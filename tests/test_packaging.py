"""The wheel holds everything an installed lit_optim needs: every module, every Hydra config (conf/ ships as
`lit_optim.conf`, recipes/ as `lit_optim.conf.recipe`), the Hydra search-path plugin, and the console script; and
pyproject.toml's hand-written `packages` list names every package directory.
"""

from __future__ import annotations

import re
import subprocess
import zipfile
from pathlib import Path

import pytest
import tomllib
import wheel_build

REPO = wheel_build.REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    with zipfile.ZipFile(wheel_build.build_wheel(tmp_path_factory.mktemp("wheel"))) as zf:
        yield zf


@pytest.fixture(scope="module")
def wheel_names(wheel) -> set[str]:
    return set(wheel.namelist())


def checkout(pattern: str, root: str) -> list[Path]:
    """Files of the checkout (tracked or new, not ignored) under `root` matching `pattern`."""
    return sorted(REPO / f for f in wheel_build._checkout_files()
                  if Path(f).match(pattern) and f.startswith(root + "/") and not (REPO / f).is_symlink())


def test_every_module_is_in_the_wheel(wheel_names):
    modules = [p.relative_to(REPO).as_posix() for p in checkout("*.py", "lit_optim")]
    assert "lit_optim/train.py" in modules
    assert sorted(set(modules) - wheel_names) == []


def test_every_config_and_recipe_is_in_the_wheel(wheel_names):
    conf = {"lit_optim/conf/" + p.relative_to(REPO / "conf").as_posix() for p in checkout("*.yaml", "conf")
            if not p.relative_to(REPO / "conf").as_posix().startswith("recipe/")}
    recipes = {"lit_optim/conf/recipe/" + p.relative_to(REPO / "recipes").as_posix()
               for p in checkout("*.yaml", "recipes")}  # recipes/base/ too
    assert "lit_optim/conf/train.yaml" in conf and "lit_optim/conf/optim/adamw_8bit.yaml" in conf
    assert "lit_optim/conf/recipe/llama31_8b_paged_adamw_8bit.yaml" in recipes
    assert sorted((conf | recipes) - wheel_names) == []
    assert {"lit_optim/conf/__init__.py", "lit_optim/conf/recipe/__init__.py"} <= wheel_names
    # Nothing else lands in the config package (e.g. a stale file from an old build).
    shipped = {n for n in wheel_names if n.startswith("lit_optim/conf/") and n.endswith(".yaml")}
    assert shipped == conf | recipes


def test_hydra_plugin_and_console_script_are_in_the_wheel(wheel, wheel_names):
    plugin = {p.relative_to(REPO).as_posix() for p in checkout("*.py", "hydra_plugins")}
    assert "hydra_plugins/lit_optim_searchpath/lit_optim_searchpath.py" in plugin
    assert plugin <= wheel_names
    # hydra_plugins is a namespace package shared with other plugins: it must not get an __init__.py of ours.
    assert "hydra_plugins/__init__.py" not in wheel_names
    entry_points = next(n for n in wheel_names if n.endswith(".dist-info/entry_points.txt"))
    assert "lit-optim = lit_optim.cli:main" in wheel.read(entry_points).decode()


def test_pyproject_packages_cover_every_package_directory():
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    package_dir = tool.get("package-dir", {})

    def source_dir(package: str) -> Path:
        for prefix, where in sorted(package_dir.items(), key=lambda kv: -len(kv[0])):
            if package == prefix or package.startswith(prefix + "."):
                return REPO / where / Path(*package[len(prefix):].split(".")[1:])
        return REPO / Path(*package.split("."))

    # Every directory with Python modules under lit_optim/ and hydra_plugins/ (hydra_plugins itself is a namespace).
    found = {p.parent for root in ("lit_optim", "hydra_plugins") for p in checkout("*.py", root)}
    needed = {".".join(d.relative_to(REPO).parts) for d in found}
    assert sorted(needed - listed) == [], "add these to [tool.setuptools] packages in pyproject.toml"
    for package in listed:
        assert source_dir(package).is_dir(), f"{package}: no directory {source_dir(package)}"
    assert {"lit_optim.conf", "lit_optim.conf.recipe"} <= listed
    assert source_dir("lit_optim.conf") == REPO / "conf" and source_dir("lit_optim.conf.recipe") == REPO / "recipes"


def test_throwaway_env_sees_the_packages_of_the_virtualenv_it_is_made_from(tmp_path):
    """The suite run from a virtual environment: the env `wheel_build` makes for the installed-wheel tests must see
    that environment's packages (Hydra, torch ...), not only its base interpreter's."""
    outer = wheel_build.make_env(tmp_path / "outer")  # a virtualenv, with a package only it has
    own = subprocess.run([str(outer), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    (Path(own) / "only_in_the_outer_venv.py").write_text("")
    make_inner = (f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r}); import wheel_build; "
                  f"from pathlib import Path; print(wheel_build.make_env(Path({str(tmp_path / 'inner')!r})))")
    proc = subprocess.run([str(outer), "-c", make_inner], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    inner = proc.stdout.strip()
    check = "import sys, only_in_the_outer_venv, hydra; print(sys.prefix != sys.base_prefix)"
    proc = subprocess.run([inner, "-c", check], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"  # and it is a virtual environment of its own


def test_the_all_extra_installs_what_every_logger_config_needs():
    """`pip install -e '.[all]'` then `logger=tensorboard` (or any conf/logger/) must not fail on a missing package."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(requirements: list[str]) -> set[str]:
        out = set()
        for req in requirements:
            name, _, inner = re.match(r"([A-Za-z0-9_.-]+)(\[([^\]]*)\])?", req).groups()
            if name == "lit-optim":
                for extra in inner.split(","):
                    out |= names(extras[extra.strip()])
            else:
                out.add(name.lower())
        return out

    installed = names(project["dependencies"]) | names(extras["all"])
    needs = {"WandbLogger": "wandb", "TensorBoardLogger": "tensorboard", "CSVLogger": "lightning"}
    for path in (REPO / "conf" / "logger").glob("*.yaml"):
        target = re.search(r"_target_:\s*\S+\.(\w+)", path.read_text())
        if target:
            assert needs[target.group(1)] in installed, f"{path.name}: add {needs[target.group(1)]} to the all extra"
