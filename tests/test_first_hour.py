"""A newcomer's first hour with `lit-optim train`, run as they run it (subprocesses, side by side):

- a sweep (`-m`) with the default, offline W&B logger gives one directory and one W&B run per job, each named after
  its overrides and holding its own optimizer;
- the output has no known third-party noise and no line twice, and each job ends with its summary;
- an online W&B run that cannot reach its server logs offline within seconds instead of stalling;
- `logger=tensorboard` works (skipped without tensorboard);
- `import lit_optim` reaches `lit_optim.callbacks` and `lit_optim.wandb_offline` without importing Lightning first.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lit_optim.threads import SMALL_MODEL_PARAMS, CpuThreads, threads_for
from lit_optim.wandb_offline import OfflineRun

SMALL = ["trainer.max_steps=4", "trainer.log_every_n_steps=2", "trainer.val_check_interval=4",
         "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "data.train_tokens=16384",
         "callbacks.checkpoint=null"]
SWEEP = ("adamw_8bit", "adamw_torch_8bit")  # a bitsandbytes and a torchao optimizer: both libraries' noise
# Known third-party noise that must not reach a user's terminal.
NOISE = [
    "Failed to load CPU gemm_4bit_forward",  # bitsandbytes, at import on CPU
    "pip install kernels",
    "_stable_hash_for_caching",  # torch's compile cache about torchao's state subclasses
    "isinstance(treespec, LeafSpec)",  # torch's pytree about Lightning's code
    "The anonymous setting has no effect",  # wandb about Lightning's WandbLogger
    "Tip: For seamless cloud",  # Lightning's advertisement
    "lit_optim built ",  # build_optimizer's own line: the mixin reports the same build once
    "To copy construct from a tensor",  # Lightning's LR monitor on torchao's tensor learning rate
]


def lit_optim(cwd: Path, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`lit-optim ARGS` in `cwd`; `env` adds variables to this process's (None removes one)."""
    code = "import sys; from lit_optim.cli import main; sys.exit(main())"
    base = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    base.pop("WANDB_SILENT", None)  # W&B's own messages stay, as a user sees them
    # A user's shell has no OMP_NUM_THREADS; Lightning's DDP launcher sets it in the test process (other tests).
    base.pop("OMP_NUM_THREADS", None)
    base.update(env or {})
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          env={k: v for k, v in base.items() if v is not None}, timeout=timeout)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed: connections are refused


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path, float]]:
    root = tmp_path_factory.mktemp("first_hour")
    unreachable = {"WANDB_MODE": None, "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{closed_port()}"}
    jobs = {
        "sweep": (root / "sweep", ["train", "-m", f"optim={','.join(SWEEP)}", *SMALL], None),
        "unreachable": (root / "unreachable", ["train", "hydra.run.dir=run", "logger.offline=false", "validate=false",
                                               *SMALL], unreachable),
    }
    if _has_tensorboard():
        jobs["tensorboard"] = (root / "tensorboard", ["train", "hydra.run.dir=run", "logger=tensorboard", *SMALL], None)

    def run(name: str):
        cwd, args, env = jobs[name]
        start = time.perf_counter()
        proc = lit_optim(cwd, *args, env=env)
        return proc, cwd, time.perf_counter() - start

    with ThreadPoolExecutor(len(jobs)) as pool:
        return dict(zip(jobs, pool.map(run, jobs)))


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def ok(runs, name: str) -> tuple[subprocess.CompletedProcess, Path, float]:
    proc, cwd, seconds = runs[name]
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, cwd, seconds


def job_outputs(stdout: str) -> list[str]:
    """The stdout of each job of a multirun (Hydra logs `#<n> : <overrides>` as each job starts)."""
    return re.split(r"^.*\[HYDRA\]\s+#\d+ : .*$", stdout, flags=re.M)[1:]


def normalized(line: str) -> str:
    """A log line without its logging prefix: Hydra's `[time][logger][LEVEL] - ` or Lightning's `INFO: `."""
    line = re.sub(r"^\[[\d\- :,]+\]\[[^\]]*\]\[\w+\] - ", "", line)
    return re.sub(r"^(INFO|WARNING|DEBUG): ", "", line).strip()


# --- a sweep with the default W&B logger -------------------------------------------------------------------------


def test_sweep_gives_one_directory_and_one_wandb_run_per_job(runs):
    _, cwd, _ = ok(runs, "sweep")
    (sweep_dir,) = {p.parent.parent for p in cwd.glob("multirun/*/*/*/.hydra")}
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    # Named after what the job changed (and the shared overrides), not 0/ and 1/.
    assert [re.search(r"optim=(\w+)", j).group(1) for j in jobs] == sorted(SWEEP), jobs
    ids = set()
    for job in jobs:
        name = re.search(r"optim=(\w+)", job).group(1)
        (wandb_file,) = (sweep_dir / job / "wandb").rglob("run-*.wandb")  # one run per job, in the job's directory
        run = OfflineRun.read(wandb_file)
        assert run.record_types.get("exit") == 1  # finished at the end of its job
        assert run.config["optim"]["name"] == name  # its own optimizer, not the last job's
        assert run.config["optimizer_built"]["class"].endswith("AdamW8bit")
        assert run.config["optimizer_built"]["backend"] == ("bitsandbytes" if name == "adamw_8bit" else "torchao")
        assert run.name == job  # the W&B run is named as its directory
        assert run.history_values("optim_state/bytes")
        ids.add(run.run_id)
    assert len(ids) == len(SWEEP)


def test_output_has_no_third_party_noise_and_no_line_twice(runs):
    proc, _, _ = ok(runs, "sweep")
    for text in NOISE:
        assert text not in proc.stdout + proc.stderr, text
    outputs = job_outputs(proc.stdout)
    assert len(outputs) == len(SWEEP)
    ours = [normalized(line) for line in proc.stderr.splitlines() if not line.startswith("wandb:")]
    for out in outputs:
        lines = [normalized(line) for line in out.splitlines()]
        lines = [line for line in lines if line and set(line) - set("─━│┃")]  # the model summary's rules
        repeated = {line for line in lines if lines.count(line) > 1}
        assert not repeated, repeated
        # Lightning's lines came out on both streams; the build summary three times (two of them on stdout).
        assert not set(lines) & set(ours), set(lines) & set(ours)
        assert sum("trainable params in 2 groups" in line for line in lines) == 1


def test_each_job_ends_with_a_summary(runs):
    proc, cwd, _ = ok(runs, "sweep")
    for name, out in zip(SWEEP, job_outputs(proc.stdout)):
        summary = out[out.index("lit-optim: finished"):]
        assert summary.startswith(f"lit-optim: finished {name} after 4 optimizer steps: train/loss ")
        assert re.search(r"optimizer state: [\d.]+ bytes/param \(.+ of fp32 AdamW's\) in host memory", summary)
        assert re.search(r"[\d,]+ tokens/s", summary) and "peak host memory" in summary
        (path,) = re.findall(r"W&B, offline: (\S+)", summary)
        assert (cwd / path).is_dir() and f"wandb sync {path}" in summary
        assert OfflineRun.find(cwd / path).config["optim"]["name"] == name  # the path it names is this job's run
        assert re.search(r"run directory: \S+optim=" + name, summary)
    # torch's threads set for the small model on the CPU (once: the second job finds them set)
    assert "1 CPU thread for this small model" in job_outputs(proc.stdout)[0]


# --- W&B without its server ----------------------------------------------------------------------------------------


def test_online_wandb_without_its_server_logs_offline_within_seconds(runs):
    """An API key but no server (a closed port): before, wandb waited 90 s for it and then lit-optim fell back to
    CSV. Now a probe of a few seconds sends the run offline at once, kept in W&B's format."""
    proc, cwd, seconds = ok(runs, "unreachable")
    assert "cannot be reached" in proc.stderr and "logging offline" in proc.stderr and "wandb sync" in proc.stderr
    (wandb_file,) = (cwd / "run" / "wandb").rglob("run-*.wandb")
    assert OfflineRun.read(wandb_file).history_values("train/loss")
    assert "W&B could not start" not in proc.stderr and not (cwd / "run" / "csv").exists()
    assert seconds < 75, seconds  # a few seconds of probing on top of the run, not wandb's 90 s timeout


def test_online_problem_names_the_fix_when_not_logged_in(monkeypatch, tmp_path):
    from lit_optim import wandb_start

    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # an empty netrc: nobody logged in
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("WANDB_BASE_URL", "https://api.example.invalid")
    assert "not logged in" in wandb_start.online_problem() and "wandb login" in wandb_start.online_problem()
    (tmp_path / "netrc").write_text("machine api.example.invalid login user password " + "k" * 40 + "\n")
    (tmp_path / "netrc").chmod(0o600)
    assert wandb_start.has_credentials("https://api.example.invalid")
    # A key saved by `wandb login` for api.wandb.ai counts for wandb's default server too, as wandb counts it.
    monkeypatch.delenv("WANDB_BASE_URL")
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert wandb_start.has_credentials(wandb_start.base_url())


def test_probe_gives_up_after_its_timeout_even_when_connect_hangs(monkeypatch):
    """`create_connection`'s own timeout does not cover a name lookup that hangs; the probe's thread bounds both."""
    from lit_optim import wandb_start

    monkeypatch.setattr(wandb_start.socket, "create_connection", lambda *a, **k: time.sleep(30))
    start = time.perf_counter()
    assert wandb_start.reachable("api.wandb.ai", 443, timeout=0.5) is False
    assert time.perf_counter() - start < 2


# --- TensorBoard, threads, imports ---------------------------------------------------------------------------------


def test_tensorboard_logger_writes_event_files(runs):
    if "tensorboard" not in runs:
        pytest.skip("tensorboard is not installed (pip install -e '.[all]' installs it)")
    proc, cwd, _ = ok(runs, "tensorboard")
    assert list((cwd / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    assert "TensorBoard: `tensorboard --logdir" in proc.stdout


def test_threads_one_for_small_cpu_models_unless_the_user_says(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads_for(None, 500_000, on_cpu=True) == 1
    assert threads_for(None, SMALL_MODEL_PARAMS, on_cpu=True) is None  # a big model keeps torch's default
    assert threads_for(None, 500_000, on_cpu=False) is None  # GPU runs: torch's default for the host side
    assert threads_for(3, 500_000, on_cpu=True) == 3  # torch_threads=3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads_for(None, 500_000, on_cpu=True) is None  # the user's OMP_NUM_THREADS stays
    from lit_optim.errors import IncompatibleConfigError

    with pytest.raises(IncompatibleConfigError, match="torch_threads must be a positive integer"):
        CpuThreads(0)


def test_import_lit_optim_reaches_callbacks_and_the_wandb_reader():
    code = ("import sys, lit_optim\n"
            "assert 'lightning' not in sys.modules  # import lit_optim stays light\n"
            "monitors = lit_optim.callbacks.default_monitors()\n"
            "print(len(monitors), lit_optim.wandb_offline.OfflineRun.__name__, 'callbacks' in dir(lit_optim))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["5", "OfflineRun", "True"]
