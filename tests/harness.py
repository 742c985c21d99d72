"""Real Lightning runs of the built-in task, shared by the per-optimizer tests.

`run_task` trains the tiny LM for a few steps; `resume_matches` trains N steps straight, then the same run resumed
from the checkpoint taken half-way, and compares parameters and optimizer state exactly.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lit_optim.task.data import SyntheticTextDataModule
from lit_optim.task.module import LanguageModelTask

TINY_MODEL = {"arch": "tiny", "vocab_size": 256, "d_model": 64, "n_layers": 2, "n_heads": 2, "max_seq_len": 32}


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def make_module(optim: dict[str, Any], scheduler: dict | None = None, model: dict | None = None):
    return LanguageModelTask(model=model or TINY_MODEL, optim=optim, scheduler=scheduler)


def make_data(**kw) -> SyntheticTextDataModule:
    return SyntheticTextDataModule(**{"vocab_size": 256, "seq_len": 32, "batch_size": 8, "train_tokens": 16384,
                                      "val_tokens": 1024, **kw})


def run_task(
    optim: dict[str, Any],
    steps: int,
    *,
    tmp_path: Path | None = None,
    ckpt_path: str | None = None,
    checkpoint_every: int | None = None,
    scheduler: dict | None = None,
    model: dict | None = None,
    callbacks: list | None = None,
    seed: int = 0,
    **trainer_kw: Any,
):
    """Fit for `steps` optimizer steps on CPU; returns (module, trainer, losses)."""
    L.seed_everything(seed, verbose=False)
    module = make_module(optim, scheduler, model)
    recorder = LossRecorder()
    cbs = [recorder, *(callbacks or [])]
    if checkpoint_every:
        cbs.append(ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=checkpoint_every,
                                   save_top_k=-1, filename="{step}"))
    trainer = L.Trainer(
        max_steps=steps, accelerator=trainer_kw.pop("accelerator", "cpu"), devices=1, logger=False,
        enable_checkpointing=bool(checkpoint_every), enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=cbs, **trainer_kw,
    )
    trainer.fit(module, make_data(), ckpt_path=ckpt_path, weights_only=True)
    return module, trainer, recorder.losses


def _flatten_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor | Any]:
    """Every value of the optimizer state in param order, tensor subclasses unwrapped to their inner tensors (and
    objects that hold tensors, as FlashOptim's moments, to those tensors)."""
    from lit_optim.state_bytes import leaf_tensors, state_tensors

    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key in sorted(state):
                for t in state_tensors(state[key]):
                    out.extend((key, leaf.detach().cpu()) for leaf in leaf_tensors(t))
                if state[key] is None or isinstance(state[key], (int, float, bool, str)):
                    out.append((key, state[key]))
    return out


def states_equal(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> bool:
    fa, fb = _flatten_state(a), _flatten_state(b)
    if len(fa) != len(fb):
        return False
    for (ka, va), (kb, vb) in zip(fa, fb):
        if ka != kb:
            return False
        if isinstance(va, torch.Tensor):
            if not (isinstance(vb, torch.Tensor) and va.dtype == vb.dtype and torch.equal(va, vb)):
                return False
        elif va != vb:
            return False
    return True


def resume_matches(optim: dict[str, Any], tmp_path: Path, steps: int = 12, **kw) -> tuple[bool, bool, list[float]]:
    """(parameters equal, optimizer state equal, losses of the straight run) for straight vs. resumed half-way."""
    straight, t1, losses = run_task(optim, steps, tmp_path=tmp_path, checkpoint_every=steps // 2, **kw)
    ckpt = glob.glob(str(tmp_path / "ckpt" / f"step={steps // 2}.ckpt"))
    assert ckpt, f"no checkpoint at step {steps // 2}: {list((tmp_path / 'ckpt').glob('*'))}"
    resumed, t2, _ = run_task(optim, steps, tmp_path=tmp_path / "resumed", ckpt_path=ckpt[0], **kw)
    params_equal = all(torch.equal(x, y) for x, y in zip(straight.parameters(), resumed.parameters()))
    return params_equal, states_equal(t1.optimizers[0], t2.optimizers[0]), losses


def weights_only_resume(make_model, name: str, batches: list, **hp):
    """Registry name `name` trained on `batches` straight equals the same run saved half-way through `torch.save`,
    read back with `torch.load(weights_only=True)` into a fresh model and optimizer, and finished there: every
    parameter and every state tensor (values and dtypes), bit for bit. `make_model` builds the same model each call."""
    import io

    import lit_optim

    def train(model, opt, xs):
        for x in xs:
            opt.zero_grad()
            model(x).float().square().mean().backward()
            opt.step()

    straight = make_model()
    o1 = lit_optim.build_optimizer(straight, name, **hp)
    train(straight, o1, batches)
    half = make_model()
    o2 = lit_optim.build_optimizer(half, name, **hp)
    train(half, o2, batches[: len(batches) // 2])
    buf = io.BytesIO()
    torch.save({"model": half.state_dict(), "optim": o2.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = make_model()
    o3 = lit_optim.build_optimizer(resumed, name, **hp)
    resumed.load_state_dict(saved["model"])
    o3.load_state_dict(saved["optim"])
    train(resumed, o3, batches[len(batches) // 2:])
    for p1, p3 in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p1, p3)
        s1, s3 = o1.state[p1], o3.state[p3]
        assert s1.keys() == s3.keys()
        for key in s1:
            assert torch.equal(s1[key].cpu(), s3[key].cpu()) and s1[key].dtype == s3[key].dtype, (name, key)
    return o1


# --- helpers added for the registry/error/mixin tests ------------------------------------------------------------


class temporary_spec:
    """Register a throwaway `OptimizerSpec` for one test and remove it afterwards (the registry is process-global).

        with temporary_spec(replace(get_spec("adamw_torch"), name="test_no_clip", supports=...)) as spec: ...
    """

    def __init__(self, spec) -> None:
        self.spec = spec

    def __enter__(self):
        from lit_optim.registry import all_specs, register

        all_specs()  # load the real registry first, so it is not skipped because the registry looks non-empty
        return register(self.spec)

    def __exit__(self, *exc) -> None:
        from lit_optim import registry

        registry._SPECS.pop(self.spec.name, None)
        for alias in self.spec.aliases:
            registry._ALIASES.pop(alias, None)


def python_without(hidden: tuple[str, ...], code: str, tmp_path: Path, timeout: float = 240):
    """Run `code` in a fresh interpreter in which the top-level packages `hidden` are really absent.

    Every `sys.path` directory of this interpreter that holds one of them is mirrored into `tmp_path` with symlinks
    to everything else; the child starts with `-S -E` (no site-packages and no PYTHONPATH of its own) and gets the
    mirrored path plus the repository root. Returns the `subprocess.CompletedProcess` (text mode).
    """
    import os
    import subprocess
    import sys

    import lit_optim

    def is_hidden(entry: str) -> bool:  # a module, package or distribution record named in `hidden`
        stem = entry.split("-")[0].split(".")[0].lower()
        return stem in {h.replace("-", "_").lower() for h in hidden}

    repo = str(Path(lit_optim.__file__).resolve().parent.parent)
    path = [repo]
    for i, entry in enumerate(p for p in sys.path if p and os.path.isdir(p)):
        names = os.listdir(entry)
        if not any(is_hidden(n) for n in names):
            path.append(entry)
            continue
        mirror = tmp_path / f"path{i}"
        mirror.mkdir(parents=True)
        for n in names:
            if not is_hidden(n):
                os.symlink(os.path.join(entry, n), mirror / n)
        path.append(str(mirror))
    prelude = f"import sys; sys.path[:0] = {path!r}\n"
    return subprocess.run([sys.executable, "-S", "-E", "-c", prelude + code], capture_output=True, text=True,
                          timeout=timeout, cwd=str(tmp_path))


def stand_in_trainer(strategy, **settings):
    """A stand-in Trainer holding a real `strategy` and what the checks before step 1 read, for strategies Lightning
    will not build a Trainer with here (no GPU). `settings` override the rest."""
    from types import SimpleNamespace

    return SimpleNamespace(**{"strategy": strategy, "accumulate_grad_batches": 1, "gradient_clip_val": None,
                              "precision_plugin": SimpleNamespace(scaler=None), "estimated_stepping_batches": 10,
                              **settings})


def fsdp1_trainer(model=None, **settings):
    """`stand_in_trainer` with a real FSDPStrategy whose model is `model` (the FSDP1 wrapper)."""
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = FSDPStrategy()
    strategy.model = model
    return stand_in_trainer(strategy, **settings)


def run_gloo_ranks(script: Path, *args: str, cwd: Path, timeout: int = 300) -> None:
    """Run a tests/ script that spawns its own gloo ranks (tests/gloo_group.py) in a fresh process, with a free
    rendezvous port and none of the launcher variables an earlier in-process group may have left; fail with its
    stderr."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")}
    env["GLOO_TEST_PORT"] = free_port()
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]


def read_rank_results(out: Path, world: int = 2) -> dict:
    """Rank 0's results from a gloo worker (tests/gloo_group.py `write_results`), after checking that every other
    rank wrote its own and caught no error."""
    import json

    for rank in range(1, world):
        other = json.loads(Path(f"{out}.rank{rank}").read_text())
        assert other and not {n: r["error"] for n, r in other.items() if "error" in r}, (rank, other)
    return json.loads(Path(out).read_text())


def free_port() -> str:
    """A TCP port free right now, for a process group's rendezvous: fixed ports collide with other jobs' groups."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])
