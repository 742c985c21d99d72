"""torchao's compiled step must find its compile cache again in the next process (issue 9: a 37-43 s first step
on an 8B Llama, every run)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lit_optim
from lit_optim import compile_cache
from lit_optim.registry import get_spec

WORKER = Path(__file__).resolve().parent / "compile_cache_worker.py"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No user cache dir, XDG cache in tmp_path, and the module's once-only state reset (and restored after)."""
    saved = os.environ.get(compile_cache.INDUCTOR_ENV)
    monkeypatch.delenv(compile_cache.INDUCTOR_ENV, raising=False)
    monkeypatch.delenv(compile_cache.SWITCH_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(compile_cache, "_configured", None)
    yield tmp_path
    # The module sets the variable itself (not through monkeypatch): put back what the session had.
    if saved is None:
        os.environ.pop(compile_cache.INDUCTOR_ENV, None)
    else:
        os.environ[compile_cache.INDUCTOR_ENV] = saved


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64))


def test_building_torchao_points_inductor_at_a_private_persistent_dir(clean_env):
    lit_optim.build_optimizer(_model(), "adamw_torch_8bit", lr=1e-3)
    expected = clean_env / "xdg" / "lit_optim" / "inductor"
    assert os.environ[compile_cache.INDUCTOR_ENV] == str(expected.resolve())
    assert expected.is_dir()
    assert stat.S_IMODE(expected.stat().st_mode) & 0o077 == 0  # others must not plant code that gets loaded


def test_the_users_own_cache_dir_wins(clean_env, monkeypatch):
    mine = str(clean_env / "mine")
    monkeypatch.setenv(compile_cache.INDUCTOR_ENV, mine)
    lit_optim.build_optimizer(_model(), "adamw_torch_4bit", lr=1e-3)
    assert os.environ[compile_cache.INDUCTOR_ENV] == mine
    assert not (clean_env / "xdg").exists()


def test_torchs_own_default_in_the_environment_is_not_a_user_choice(clean_env, monkeypatch):
    # importing torch._dynamo writes /tmp/torchinductor_$USER into the environment before lit_optim is asked
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv(compile_cache.INDUCTOR_ENV, default_cache_dir())
    lit_optim.build_optimizer(_model(), "adamw_torch_8bit", lr=1e-3)
    assert os.environ[compile_cache.INDUCTOR_ENV] == str((clean_env / "xdg" / "lit_optim" / "inductor").resolve())


def test_optimizers_that_do_not_compile_leave_the_environment_alone(clean_env):
    lit_optim.build_optimizer(_model(), "adamw_torch", lr=1e-3)
    assert compile_cache.INDUCTOR_ENV not in os.environ


def test_switch_turns_it_off_or_picks_the_dir(clean_env, monkeypatch):
    monkeypatch.setenv(compile_cache.SWITCH_ENV, "0")
    assert compile_cache.configure_compile_cache() is None
    assert compile_cache.INDUCTOR_ENV not in os.environ
    chosen = clean_env / "chosen"
    monkeypatch.setenv(compile_cache.SWITCH_ENV, str(chosen))
    assert compile_cache.configure_compile_cache() == str(chosen.resolve())


def test_unwritable_location_falls_back_to_torch_default(clean_env, monkeypatch, caplog):
    blocker = clean_env / "a_file"
    blocker.write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # mkdir under a regular file fails, even as root
    assert compile_cache.configure_compile_cache() is None
    assert compile_cache.INDUCTOR_ENV not in os.environ
    assert "not writable" in caplog.text


def test_each_rank_of_a_distributed_run_gets_its_own_subdirectory(clean_env, monkeypatch):
    # torchao compiles its step on FSDP2's DTensors, and the AOTAutograd cache keys those by their global shape:
    # ranks sharing a directory loaded graphs compiled for another rank's shard size.
    base = clean_env / "xdg" / "lit_optim" / "inductor"
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert compile_cache.configure_compile_cache() == str(base.resolve())  # one process: unchanged
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")  # a launcher's rank (or an initialized process group) learnt after the first call
    lit_optim.build_optimizer(_model(), "adamw_torch_8bit", lr=1e-3)
    expected = base / "rank1-of-2"
    assert os.environ[compile_cache.INDUCTOR_ENV] == str(expected.resolve())
    assert stat.S_IMODE(expected.stat().st_mode) & 0o077 == 0
    assert compile_cache.configure_compile_cache() == str(expected.resolve())  # idempotent
    monkeypatch.setenv(compile_cache.SWITCH_ENV, str(clean_env / "elsewhere"))  # the base stays as first chosen
    assert compile_cache.configure_compile_cache() == str(expected.resolve())


def test_a_users_cache_dir_is_not_split_per_rank(clean_env, monkeypatch):
    mine = str(clean_env / "mine")
    monkeypatch.setenv(compile_cache.INDUCTOR_ENV, mine)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert compile_cache.configure_compile_cache() == mine
    assert os.environ[compile_cache.INDUCTOR_ENV] == mine


def test_wrappers_around_torchao_count_as_compiling():
    assert compile_cache.compiles_step(get_spec("galore_adamw_torch_8bit"))
    assert not compile_cache.compiles_step(get_spec("galore_adamw"))
    assert compile_cache.compiles_step(get_spec("galore"), {"inner": "adamw_torch_4bit"})
    assert not compile_cache.compiles_step(get_spec("adamw_8bit"))  # bitsandbytes: no torch.compile


def _run_worker(env: dict[str, str], *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(WORKER), *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])


def _fresh_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (compile_cache.INDUCTOR_ENV, compile_cache.SWITCH_ENV,
                                                            "TRITON_CACHE_DIR")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")  # lit_optim's default location, inside the test's tmp dir
    return env


@pytest.mark.slow
def test_second_process_first_step_hits_the_compile_cache(tmp_path):
    # ~25 s on 2 cores: one cold C++ compile (most of it), then a process that must compile nothing.
    env = _fresh_env(tmp_path)
    cold = _run_worker(env)
    warm = _run_worker(env)
    expected = str((tmp_path / "xdg" / "lit_optim" / "inductor").resolve())
    assert cold["cache_dir"] == warm["cache_dir"] == expected
    assert cold["fx_miss"] > 0
    assert warm["fx_hit"] > 0 and warm["fx_miss"] == 0, warm
    assert warm["aot_hit"] > 0 and warm["aot_miss"] == 0, warm
    assert warm["first_s"] < cold["first_s"] / 3, (cold, warm)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["adamw_torch_8bit", "adamw_torch_4bit"])
def test_warm_first_step_on_llama_shapes_is_under_10s(name, tmp_path):
    env = _fresh_env(tmp_path)
    args = ("--optimizer", name, "--shapes", "llama", "--device", "cuda", "--dtype", "bfloat16")
    cold = _run_worker(env, *args)
    warm = _run_worker(env, *args)
    assert warm["fx_miss"] == 0 and warm["aot_miss"] == 0, warm
    assert warm["first_s"] < 10.0, (cold, warm)


def test_first_step_benchmark_runs_in_smoke_mode(tmp_path):
    # The GPU benchmark's subprocess trials, argument handling and table, run with an optimizer that does not
    # compile: a torchao name would add ~40 s of C++ compilation on 2 cores and test nothing more of the script.
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "first_step.py"), "--smoke", "--optimizers", "adamw_torch",
         "--steady-steps", "1", "--cache-root", str(tmp_path), "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=_fresh_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| adamw_torch |" in proc.stdout
    rows = json.loads((tmp_path / "r.json").read_text())
    assert rows[0]["cold"]["first_s"] > 0 and rows[0]["warm"]["graphs"] == 0
    assert torch.__version__ in proc.stdout
