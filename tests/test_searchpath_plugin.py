"""An existing Hydra app outside the package uses lit_optim's `optim` group after install, with one defaults entry.

tests/outside_app/ is that app: its own `my_app.py` and `conf/config.yaml` (`defaults: [optim: adamw_8bit, _self_]`),
nothing else from lit_optim. It runs in a subprocess, from a temporary directory, with the Python of a virtual
environment where lit_optim's wheel is installed -- the situation of a user after `pip install lit-optim`.
"""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import wheel_build

APP = Path(__file__).resolve().parent / "outside_app" / "my_app.py"


@pytest.fixture(scope="module")
def installed_python(tmp_path_factory) -> Path:
    return wheel_build.installed_env(tmp_path_factory.mktemp("wheel"))


RUNS = {
    "switch": ("optim=paged_adamw_8bit", "optim.lr=2e-5"),
    "default": (),
    "clash": ("optim=adamw_torch",),
    "searchpath": ("--info", "searchpath"),
}


@pytest.fixture(scope="module")
def app_runs(installed_python, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """The app run with each set of arguments, side by side, each from its own empty directory."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    env.pop("PYTHONPATH", None)

    def run(name: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(installed_python), str(APP), *RUNS[name]], cwd=tmp_path_factory.mktemp(name),
                              env=env, capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(len(RUNS)) as pool:
        return dict(zip(RUNS, pool.map(run, RUNS)))


def parse(proc: subprocess.CompletedProcess) -> dict[str, str]:
    assert proc.returncode == 0, f"app failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    out = {}
    for line in proc.stdout.splitlines():
        for part in line.split():
            key, sep, value = part.partition("=")
            if sep and key.isidentifier():
                out[key] = value
    return out


def test_app_switches_to_a_lit_optim_optimizer_from_the_command_line(app_runs):
    out = parse(app_runs["switch"])  # python my_app.py optim=paged_adamw_8bit optim.lr=2e-5
    # lit_optim's build_optimizer, from the installed wheel (not this checkout), built bitsandbytes' paged 8-bit AdamW.
    assert out["optimizer_class"] == "bitsandbytes.optim.adamw.PagedAdamW8bit"
    assert out["optimizer_name"] == "paged_adamw_8bit"
    assert float(out["lr"]) == pytest.approx(2e-5)
    assert (out["betas_type"], out["betas"]) == ("tuple", "0.9,0.999")  # lit_optim's YAML, as a tuple
    assert "site-packages" in out["lit_optim_file"] and str(wheel_build.REPO) not in out["lit_optim_file"]


def test_app_default_comes_from_its_defaults_entry(app_runs):
    out = parse(app_runs["default"])
    assert out["optimizer_class"] == "bitsandbytes.optim.adamw.AdamW8bit"  # `- optim: adamw_8bit`
    assert float(out["lr"]) == pytest.approx(1e-3)  # lit_optim's default for that name
    assert float(out["loss_last"]) < float(out["loss_first"])


def test_app_config_wins_a_name_clash(app_runs):
    # Both the app and lit_optim ship optim/adamw_torch.yaml; the app's (lr 0.0123) must be the one used.
    out = parse(app_runs["clash"])
    assert out["optimizer_class"] == "torch.optim.adamw.AdamW"
    assert float(out["lr"]) == pytest.approx(0.0123)


def test_plugin_appends_after_the_app_search_path(app_runs):
    proc = app_runs["searchpath"]
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("|")[1].strip() for line in proc.stdout.splitlines() if line.count("|") >= 3]
    providers = [r for r in rows if r and r != "Provider"]
    assert "lit-optim" in providers, proc.stdout
    assert providers.index("main") < providers.index("lit-optim"), providers
