"""FSDP2 (`fully_shard`, DTensor parameters) on CPU processes (gloo), checkpointed with torch.distributed.checkpoint
(`get_state_dict` / `dcp.save`, then `dcp.load` / `set_state_dict` into a new model and optimizer) and as a full state
dict (`StateDictOptions(full_state_dict=True)`); tests/fsdp2_resume.py does the runs. A run resumed from either
checkpoint must end, on every rank, with exactly the parameter shards and optimizer state of a run that went straight
through.

torch AdamW's moments are DTensors sharded like the parameters. lit_optim's fused low-bit optimizers keep plain
per-rank codes and scales, sized for the largest shard so every rank's have the same length, and hand them to DCP as
DTensors of shape (world, length) sharded on dim 0: each rank's row goes back to that rank. The model has a weight
whose rows do not split evenly (65 over 2 ranks), biases smaller than a block and a one-element gain (rank 1's shard
is empty).

The CI tests resume in the same processes (one process group, fresh model and optimizer objects, everything read back
from disk); the slow ones in new processes, and on 3 ranks from the 2-rank checkpoints, which must be refused.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from harness import free_port, run_gloo_ranks

from lit_optim.registry import all_specs
from lit_optim.spec import CPU, FSDP2

SCRIPT = Path(__file__).resolve().parent / "fsdp2_resume.py"
TORCH = ["adamw_torch", "adamw_torch_fused"]
FUSED = ["adamw_fused_8bit", "adamw_fused_4bit", "lion_fused_8bit"]
# State of the parameter's placement, like AdamW's, but each with its own trap: Muon orthogonalises the whole matrix,
# StableAdamW clips by the whole parameter's RMS, and schedule-free keeps z and its weight sums in the param groups.
OTHERS = ["muon", "stable_adamw", "schedule_free_adamw"]
# Every FSDP2 name that runs on the CPU without a compile (torchao's are the slow tests below), from the registry.
LIGHTNING_FSDP2 = [s.name for s in all_specs() if {FSDP2, CPU} <= s.supports and s.backend != "torchao"]
HP = {"sgd": {"momentum": 0.9}}  # some state to compare; plain SGD keeps none
BITS = {"adamw_fused_8bit": 8, "adamw_fused_4bit": 4, "lion_fused_8bit": 8}


def _spawn(root: Path, modes: str, names: list[str]) -> None:
    run_gloo_ranks(SCRIPT, modes, str(root), *names, cwd=root)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2_resume")
    _spawn(root, "straight,resume,full", TORCH + FUSED + OTHERS)  # one process group: CI stays fast
    return root


@pytest.fixture(scope="module")
def fresh_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2_resume_fresh")
    for modes in ("straight", "resume", "reshard"):  # each in its own processes and process group
        _spawn(root, modes, FUSED)
    return root


def _load(runs, name, mode, rank, when=""):
    base = runs / name / mode
    err = base / f"rank{rank}.err"
    assert not err.exists(), err.read_text()
    return torch.load(base / f"rank{rank}{when}.pt", map_location="cpu", weights_only=True)


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _differ(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys() and a
    return [k for k in a if not torch.equal(a[k], b[k]) or a[k].dtype != b[k].dtype]


def _assert_resumes_exactly(runs, name, modes=("resume", "full")):
    for rank in range(2):
        for mode in modes:
            for when in (".mid", ""):  # at the checkpoint (saved vs loaded) and K steps after it
                a, b = _load(runs, name, "straight", rank, when), _load(runs, name, mode, rank, when)
                assert a["dtensor"] == b["dtensor"] == "DTensor"
                assert _differ(a["params"], b["params"]) == [], (name, mode, rank, when)
                assert _differ(a["state"], b["state"]) == [], (name, mode, rank, when)
        # The last K steps moved every parameter with a non-empty shard on this rank.
        mid = _load(runs, name, "straight", rank, ".mid")
        assert all(not torch.equal(v, mid["params"][k]) for k, v in a["params"].items() if v.numel()), (name, rank)


@pytest.mark.parametrize("name", TORCH)
def test_fsdp2_adamw_torch_resumes_exactly_from_sharded_checkpoint(runs, name):
    _assert_resumes_exactly(runs, name)
    for rank, rows in ((0, 33), (1, 32)):  # 65 rows: 33 + 32, moments included
        a = _load(runs, name, "straight", rank)
        assert a["params"]["0.weight"].shape == a["state"]["0.weight.exp_avg"].shape == (rows, 64)
        assert float(a["state"]["0.weight.step"]) == 6.0


@pytest.mark.parametrize("name", OTHERS)
def test_fsdp2_muon_stable_and_schedule_free_resume_exactly(runs, name):
    _assert_resumes_exactly(runs, name)
    state = _load(runs, name, "straight", 0)["state"]
    want = {"muon": "0.weight.momentum_buffer", "stable_adamw": "0.weight.exp_avg_sq",
            "schedule_free_adamw": "0.weight.z"}[name]
    assert state[want].shape == (33, 64), sorted(state)  # rank 0's shard of the 65-row weight


@pytest.mark.parametrize("name", FUSED)
def test_fsdp2_fused_lowbit_resumes_exactly_from_sharded_checkpoint(runs, name):
    from torch.distributed.checkpoint import FileSystemReader

    _assert_resumes_exactly(runs, name)
    bits = BITS[name]
    r0, r1 = (_load(runs, name, "straight", r) for r in range(2))
    # Every rank's buffers are sized for the largest shard (33 x 64 = 2112 elements: 9 blocks of 256), so rank 1's
    # 32 rows use 8 blocks and leave the 9th zero; a bias (33 or 32 elements) and the gain (1 or 0) take one block.
    for key, blocks in (("0.weight", 9), ("2.weight", 9), ("0.bias", 1), ("2.bias", 1), ("3.weight", 1)):
        for s in (r0["state"], r1["state"]):
            assert s[f"{key}.exp_avg"].shape == (blocks * 256 * bits // 8,), (key, s[f"{key}.exp_avg"].shape)
            assert s[f"{key}.exp_avg_scale"].shape == (blocks,)
    assert float(r1["state"]["0.weight.exp_avg_scale"][8]) == 0.0 and float(r0["state"]["0.weight.exp_avg_scale"][8])
    assert float(r1["state"]["3.weight.exp_avg_scale"][0]) == 0.0  # an empty shard never steps
    assert float(r0["state"]["3.weight.step"]) == float(r1["state"]["3.weight.step"]) == 6.0
    # The ranks' codes differ, so a rank given the other's would not resume exactly (what DCP did with plain state).
    assert not torch.equal(r0["state"]["0.weight.exp_avg"], r1["state"]["0.weight.exp_avg"])
    # DCP saved the codes as one (2, L) tensor in two row chunks, one per rank.
    meta = FileSystemReader(str(runs / name / "ckpt")).read_metadata().state_dict_metadata
    codes = meta["optim.state.0.weight.exp_avg"]
    assert tuple(codes.size) == (2, 9 * 256 * bits // 8) and len(codes.chunks) == 2
    assert tuple(meta["optim.state.0.weight.shard_layout"].size) == (3,)
    # A plain torch.save of optimizer.state_dict() holds the codes as (ranks, L) DTensors; weights_only loads them,
    # and each rank's row is its own state at the checkpoint.
    for rank in range(2):
        saved = torch.load(runs / name / "straight" / f"rank{rank}.optim_state_dict.pt", weights_only=True)
        mid = _load(runs, name, "straight", rank, ".mid")["state"]
        codes_dt = saved["state"][0]["exp_avg"]
        assert type(codes_dt).__name__ == "DTensor" and tuple(codes_dt.shape) == (2, 9 * 256 * bits // 8)
        assert torch.equal(codes_dt.to_local()[0], mid["0.weight.exp_avg"])
        assert torch.equal(saved["state"][0]["exp_avg_scale"].to_local()[0], mid["0.weight.exp_avg_scale"])
    # The state monitor counts each rank's own bytes and parameters (no crash on DTensors).
    for s in (r0, r1):
        assert s["monitor"]["bytes"] == sum(t.numel() * t.element_size() for t in s["state"].values())
        assert s["monitor"]["params"] == sum(t.numel() for t in s["params"].values())
    assert (r0["monitor"]["params"], r1["monitor"]["params"]) == (33 * 64 + 33 + 32 * 65 + 32 + 1,
                                                                    32 * 64 + 32 + 32 * 65 + 32)


@pytest.mark.slow
@pytest.mark.parametrize("name", FUSED)
def test_fsdp2_fused_lowbit_resumes_exactly_in_new_processes(fresh_runs, name):
    _assert_resumes_exactly(fresh_runs, name, modes=("resume",))


@pytest.mark.slow
@pytest.mark.parametrize("name", FUSED)
def test_fsdp2_fused_lowbit_refuses_another_number_of_ranks(fresh_runs, name):
    for rank in range(3):
        errors = torch.load(fresh_runs / name / "reshard" / f"rank{rank}.errors.pt", weights_only=True)["errors"]
        assert len(errors) == 2, errors
        dcp_error, full_error = errors
        # DCP: the codes' (world, L) shape names the two rank counts.
        assert "Size mismatch between saved torch.Size([2, " in dcp_error and "current: torch.Size([3, " in dcp_error
        # The full state dict gets through DCP's utilities; the optimizer refuses it with the reason and the fix.
        assert "was saved sharded over 2 ranks" in full_error and "sharded over 3 ranks" in full_error, full_error
        assert "cannot be resharded exactly" in full_error and "Resume on 2 ranks" in full_error


@pytest.mark.parametrize("name", LIGHTNING_FSDP2)
def test_fsdp2_resumes_exactly_through_lightning_model_parallel(tmp_path, name):
    """Lightning's ModelParallelStrategy (lit_optim's FSDP2) on one CPU device: its checkpoint is a DCP directory."""
    import lightning as L
    from harness import TINY_MODEL, make_data
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lit_optim.task.module import LanguageModelTask

    ShardedTask = LanguageModelTask  # shards itself in configure_model under ModelParallelStrategy

    def fit(root, ckpt_path=None):
        L.seed_everything(0, verbose=False)
        module = ShardedTask(model=TINY_MODEL, optim={"name": name, "lr": 1e-2, **HP.get(name, {})})
        callbacks = [] if ckpt_path else [ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=3,
                                                          save_top_k=-1, filename="{step}")]
        trainer = L.Trainer(max_steps=6, accelerator="cpu", devices=1, strategy=ModelParallelStrategy(), logger=False,
                            enable_checkpointing=not ckpt_path, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks,
                            default_root_dir=str(root))
        trainer.fit(module, make_data(), ckpt_path=ckpt_path)
        return module, trainer.optimizers[0]

    try:
        straight, o1 = fit(tmp_path / "a")
        ckpt = tmp_path / "ckpt" / "step=3.ckpt"
        assert ckpt.is_dir()  # a sharded (DCP) checkpoint
        # `lit-optim train ckpt_path=<dir>` accepts it, and refuses it before loading on another number of ranks.
        from lit_optim import resume
        from lit_optim.errors import IncompatibleConfigError

        assert resume.read_checkpoint(ckpt) == {}
        resume.check_ranks(ckpt, 1)
        if name.startswith(("adamw_fused", "adam_fused", "lion_fused")):  # quantized per shard; plain state reshards
            with pytest.raises(IncompatibleConfigError, match="sharded over 1 ranks .* this run has 2"):
                resume.check_ranks(ckpt, 2)
        else:
            resume.check_ranks(ckpt, 2)
        resumed, o2 = fit(tmp_path / "b", str(ckpt))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert type(next(straight.parameters())).__name__ == "DTensor"
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p.to_local(), q.to_local())
        assert o1.state[p] and o1.state[p].keys() == o2.state[q].keys()
        for k, v in o1.state[p].items():  # StableAdamW keeps kahan_comp=None for fp32 parameters
            assert torch.equal(_local(v), _local(o2.state[q][k])) if torch.is_tensor(v) else v == o2.state[q][k], k


TORCHAO = ["adamw_torch_8bit", "adamw_torch_4bit"]
TORCHAO_SCRIPT = Path(__file__).resolve().parent / "fsdp2_torchao.py"
TORCHAO_LIGHTNING = Path(__file__).resolve().parent / "fsdp2_torchao_lightning.py"
SUBCLASS = {"adamw_torch_8bit": "OptimState8bit", "adamw_torch_4bit": "OptimState4bit"}


def _torchao_env(**extra: str) -> dict[str, str]:
    drop = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "TORCHINDUCTOR_CACHE_DIR",
            "LIT_OPTIM_COMPILE_CACHE")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "GLOO_TEST_PORT": free_port(), **extra}


def _torchao_runs(tmp_path, names, cache="lit_optim"):
    for mode in ("straight", "resume"):
        proc = subprocess.run([sys.executable, str(TORCHAO_SCRIPT), mode, str(tmp_path), *names], capture_output=True,
                              text=True, timeout=600, env=_torchao_env(FSDP2_TORCHAO_CACHE=cache), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]


def _assert_torchao_resumed(tmp_path, name):
    types = []
    for rank in range(2):
        for when in (".mid", ""):
            a, b = _load(tmp_path, name, "straight", rank, when), _load(tmp_path, name, "resume", rank, when)
            assert a["types"] == b["types"]
            assert _differ(a["params"], b["params"]) == [], (rank, when)
            assert _differ(a["state"], b["state"]) == [], (rank, when)
        types.append(a["types"])
        mid = _load(tmp_path, name, "straight", rank, ".mid")
        assert all(not torch.equal(v, mid["params"][k]) for k, v in a["params"].items())
    assert types[0] == types[1]  # the same precision for each parameter on both ranks
    # (256, 128) and (128, 256): 16384 elements a rank, whole blocks: low-bit. (129, 128): 65 + 64 rows; torchao's own
    # choice would be fp32 on rank 0 (8320 elements, not whole blocks) and low-bit on rank 1 (8192).
    assert types[0]["0.weight.exp_avg_sq"] == types[0]["2.weight.exp_avg_sq"] == SUBCLASS[name]
    assert types[0]["4.weight.exp_avg_sq"] == "Tensor"


@pytest.mark.slow
@pytest.mark.parametrize("name", TORCHAO)
def test_fsdp2_torchao_lowbit_decides_precision_per_parameter_and_resumes_exactly(tmp_path, name):
    """torchao under FSDP2, built through lit_optim (which decides low-bit vs fp32 from the whole parameter): every
    rank keeps the same kind of state for a parameter, and a DCP resume in new processes is exact. Both ranks are
    given one lit_optim compile cache directory (LIT_OPTIM_COMPILE_CACHE), as on a real machine: torchao compiles its
    step on DTensors and torch's AOTAutograd cache keys those by their global shape, so before lit_optim split the
    directory per rank (and kept that cache out of DTensor steps) the resumed rank 1 loaded rank 0's graph for its
    65-row shard and stopped on an inductor shape assert."""
    _torchao_runs(tmp_path, [name])
    _assert_torchao_resumed(tmp_path, name)
    for rank in range(2):  # one directory per rank and world size under the shared one
        assert (tmp_path / "compile_cache" / f"rank{rank}-of-2").is_dir()


@pytest.mark.slow
def test_fsdp2_torchao_8bit_and_4bit_in_one_process_with_a_users_shared_cache_dir(tmp_path):
    """A user's own TORCHINDUCTOR_CACHE_DIR, shared by both ranks (lit_optim never changes it), and two torchao
    optimizers of different bit widths in one process: the AOTAutograd cache, which cannot tell shards or the state
    subclass inside a DTensor apart, is kept out of DTensor steps, so neither the other rank's graph nor the 8-bit
    graph of a same-shaped parameter is loaded for a step."""
    _torchao_runs(tmp_path, TORCHAO, cache="user")
    for name in TORCHAO:
        _assert_torchao_resumed(tmp_path, name)


@pytest.mark.slow
def test_fsdp2_torchao_lowbit_resumes_exactly_through_lightning_on_two_ranks(tmp_path):
    """Lightning's ModelParallelStrategy (FSDP2 over both devices) on two CPU processes with lit_optim's default
    compile cache (one directory given to both ranks, split per rank by lit_optim): adamw_torch_4bit trains a TinyLM
    whose (129, 128) embedding and head split 65 + 64 rows, checkpoints (a DCP directory) at step 3, and a resume in
    new processes ends bitwise equal to the straight run on each rank."""
    name = "adamw_torch_4bit"
    for mode in ("straight", "resume"):
        proc = subprocess.run([sys.executable, str(TORCHAO_LIGHTNING), str(tmp_path), name, mode], capture_output=True,
                              text=True, timeout=600, cwd=tmp_path,
                              env=_torchao_env(LIT_OPTIM_COMPILE_CACHE=str(tmp_path / "compile_cache")))
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / name / "ckpt" / "step=3.ckpt").is_dir()
    types = []
    for rank in range(2):
        a = torch.load(tmp_path / name / "straight" / f"rank{rank}.pt", map_location="cpu", weights_only=True)
        b = torch.load(tmp_path / name / "resume" / f"rank{rank}.pt", map_location="cpu", weights_only=True)
        assert a["global_step"] == b["global_step"] == 6
        assert a["cache_dir"] == b["cache_dir"] == str((tmp_path / "compile_cache" / f"rank{rank}-of-2").resolve())
        assert a["params"]["embed.weight"].shape == ((65, 128), (64, 128))[rank]  # sharded over both ranks
        assert a["types"] == b["types"]
        assert _differ(a["params"], b["params"]) == [], rank
        assert _differ(a["state"], b["state"]) == [], rank
        types.append(a["types"])
    assert types[0] == types[1]
    assert types[0]["embed.weight.exp_avg_sq"] == types[0]["lm_head.weight.exp_avg_sq"] == "Tensor"  # 65 + 64 rows
    assert types[0]["blocks.0.qkv.weight.exp_avg_sq"] == "OptimState4bit"
