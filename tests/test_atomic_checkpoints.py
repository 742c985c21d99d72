"""Checkpoints are written atomically in their own directory: a `kill -9` at any moment leaves only loadable files.

Lightning's own writer stages the file in $TMPDIR; with $TMPDIR on another filesystem (here /dev/shm) its final move
is a copy, and a kill during that copy used to leave a truncated epoch=...ckpt and last.ckpt behind.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from test_cli import EXE, train_args

# Big enough (~3M parameters, ~40 MB per checkpoint with AdamW state) that a save takes a while; checkpoints every
# step, keeping only the newest (so older ones are deleted while others are written, too).
RUN = ["model.d_model=256", "model.n_layers=4", "data.batch_size=2", "data.seq_len=16", "trainer.max_steps=10000",
       "trainer.accelerator=cpu", "logger=none", "callbacks=basic", "callbacks.lr_monitor=null", "validate=false",
       "trainer.enable_progress_bar=false", "callbacks.checkpoint.every_n_train_steps=1",
       "callbacks.checkpoint.save_top_k=1"]


def other_filesystem_tmpdir(tmp_path: Path) -> Path:
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("needs a writable /dev/shm to put TMPDIR on another filesystem than the checkpoints")
    if os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm is on the same filesystem as the test's temp directory; nothing to cross")
    return shm


def writes_in_progress(directory: Path, sizes: dict[str, int]) -> bool:
    """Whether a file in `directory` appeared or changed size since the previous call (a save is under way)."""
    changed = False
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return False
    for entry in entries:
        try:
            size = entry.stat().st_size
        except FileNotFoundError:
            continue
        if sizes.get(entry.name) != size:
            changed = True
            sizes[entry.name] = size
    return changed


def kill_during_save(proc: subprocess.Popen, ckpt_dir: Path, after: int, delay: float, deadline: float) -> None:
    """SIGKILL `proc` `delay` s into the first write seen after `after` distinct .ckpt files have appeared."""
    sizes: dict[str, int] = {}
    while time.monotonic() < deadline and proc.poll() is None:
        writing = writes_in_progress(ckpt_dir, sizes)
        if writing and sum(name.endswith(".ckpt") for name in sizes) >= after:
            time.sleep(delay)
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_kill_during_saves_leaves_only_loadable_checkpoints(tmp_path):
    tmpdir = other_filesystem_tmpdir(tmp_path) / f"lit_optim_test_{os.getpid()}"
    tmpdir.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmpdir), "WANDB_MODE": "disabled"}
    env.pop("HYDRA_FULL_ERROR", None)
    rng = random.Random(0)
    # Three runs side by side, each killed at another moment: in the first write, and a little way into a write
    # after 2 and after 4 checkpoint files had appeared (step checkpoints, last.ckpt; older ones are being deleted).
    moments = [(0, 0.0), (2, rng.uniform(0.005, 0.03)), (4, rng.uniform(0.0, 0.01))]
    runs = []
    for i, _ in enumerate(moments):
        run_dir = tmp_path / f"run{i}"
        runs.append((subprocess.Popen([EXE, *train_args(run_dir, *RUN)], cwd=tmp_path, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), run_dir / "checkpoints"))
    deadline = time.monotonic() + 60
    try:
        for (proc, ckpt_dir), (after, delay) in zip(runs, moments):
            kill_during_save(proc, ckpt_dir, after, delay, deadline)
    finally:
        for proc, _ in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(tmpdir, ignore_errors=True)
    for (proc, ckpt_dir), (after, _) in zip(runs, moments):
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
        files = sorted(p.name for p in ckpt_dir.iterdir())
        ckpts = [name for name in files if name.endswith(".ckpt")]
        assert len(ckpts) >= min(after, 1), files
        # Besides checkpoints, at most the hidden temporary file of the write that was killed.
        assert all(name.startswith(".") and name.endswith(".partial") for name in set(files) - set(ckpts)), files
        for name in ckpts:
            checkpoint = torch.load(ckpt_dir / name, map_location="cpu", weights_only=True)
            assert checkpoint["global_step"] >= 1 and checkpoint["optimizer_states"], name


def test_atomic_save_leaves_the_old_file_when_the_write_fails(tmp_path):
    from lit_optim.checkpoint import atomic_save

    target = tmp_path / "last.ckpt"
    atomic_save({"step": 1}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"step": 2, "bad": Unpicklable()}, target)
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)        # the mode of an ordinary file, not mkstemp's
