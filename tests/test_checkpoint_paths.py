"""Checkpoints load through every Lightning path, in a fresh process, with no import the user has to know about.

One checkpoint per kind of optimizer state (torch AdamW, torchao 8-bit and 4-bit, bitsandbytes 8-bit, GaLore,
in-backward, schedule-free), written once per test session; then one fresh process per path reads all of them:
plain ``torch.load(weights_only=True)`` and ``load_from_checkpoint``, ``Trainer.fit/validate/test(ckpt_path=...)``,
``fit --ckpt_path`` in a LightningCLI script, and Fabric's ``fabric.load``. The optimizer state restored must equal
the state that was saved, exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_support import KINDS, TORCHAO_KINDS, available_kinds, write_checkpoints

from lit_optim.plain_state import MARK, from_plain, to_plain

HERE = Path(__file__).resolve().parent


GROUPS = {
    "core": [k for k in available_kinds() if k not in TORCHAO_KINDS],
    # torchao compiles its step on the first one (20-40 s per process on a cold cache): in the slow tier. The plain
    # format of its state is checked in the fast tier below, without a step.
    "torchao": list(TORCHAO_KINDS),
}
SLOW = {"torchao": pytest.mark.slow}


@pytest.fixture(scope="session")
def checkpoint_index(tmp_path_factory):
    """index.json of each group's Lightning and Fabric checkpoints and references, written on first use."""
    made: dict[str, Path] = {}

    def index(group: str) -> Path:
        if group not in made:
            root = tmp_path_factory.mktemp(f"checkpoints_{group}")
            write_checkpoints(root, GROUPS[group])
            made[group] = root / "index.json"
        return made[group]

    return index


@pytest.mark.parametrize("group", [pytest.param(g, marks=SLOW.get(g, ())) for g in GROUPS])
def test_checkpoints_hold_only_plain_tensors(group, checkpoint_index):
    """Nothing in any checkpoint needs a class registered to load: `weights_only=True` reads it in any process,
    with any map_location. The torchao state is there as its inner tensors (codes, scale, qmap)."""
    index = json.loads(checkpoint_index(group).read_text())
    for kind in GROUPS[group]:
        for name in ("lightning", "fabric"):
            assert torch.serialization.get_unsafe_globals_in_checkpoint(index[kind][name]) == [], (kind, name)
        if kind in TORCHAO_KINDS:
            state = torch.load(index[kind]["lightning"], weights_only=True)["optimizer_states"][0]["state"]
            quantized = [v for s in state.values() for v in s.values() if isinstance(v, dict) and MARK in v]
            assert quantized and all(set(q["tensors"]) == {"codes", "scale", "qmap"} for q in quantized), kind


PATHS = {
    "load": "torch.load(weights_only=True) and Module.load_from_checkpoint(path)",
    "fit": "Trainer.fit/validate/test(ckpt_path=...) from a plain script",
    "cli": "fit --ckpt_path in a LightningCLI script",
    "fabric": "fabric.load into lit_optim.build_optimizer + fabric.setup, then a step",
}


def run_worker(paths: list[str], index: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(HERE / "checkpoint_paths_worker.py"), ",".join(paths), str(index)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=index.parent)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    report = json.loads(lines[-1][len("RESULT "):])
    # Nothing imported torchao before the first checkpoint was read (for load and fit: the old-format one).
    assert report["torchao_imported_before_first_read"] is False
    failed = {(p, k): v for p, kinds in report["results"].items() for k, v in kinds.items() if v != "ok"}
    assert not failed, f"{failed}\n{proc.stderr[-3000:]}"
    return report["results"]


def cli_paths() -> list[str]:
    """Every path; LightningCLI's only where its requirement (jsonargparse[signatures], the `test` extra) is met."""
    from lightning.pytorch import cli

    return [p for p in PATHS if p != "cli" or bool(getattr(cli, "_JSONARGPARSE_SIGNATURES_AVAILABLE", False))]


def test_core_kinds_load_through_every_path_in_a_fresh_process(checkpoint_index):
    """torch, bitsandbytes 8-bit, GaLore, in-backward, schedule-free: every path, one fresh process."""
    results = run_worker(cli_paths(), checkpoint_index("core"))
    assert {p: set(kinds) for p, kinds in results.items()} == {p: set(GROUPS["core"]) for p in cli_paths()}


@pytest.mark.slow
@pytest.mark.parametrize("path", list(PATHS))
def test_torchao_kinds_load_in_a_fresh_process(path, checkpoint_index):
    """torchao 8-bit and 4-bit, one fresh process per path (the first read happens before torchao is imported);
    for load and fit also a checkpoint in the old format (torchao's subclasses pickled), through the Trainer's
    reader."""
    if path not in cli_paths():
        pytest.skip("LightningCLI needs jsonargparse[signatures] (pip install -e '.[test]')")
    results = run_worker([path], checkpoint_index("torchao"))
    old = {"torchao_8bit_old_format"} if path in ("load", "fit") else set()
    assert set(results[path]) == set(TORCHAO_KINDS) | old


# --- the encoding itself, without training ------------------------------------------------------------------------


def _torchao_optimizer_with_state():
    """`adamw_torch_8bit` on a 64x64 layer, its state filled as torchao's first step would (no compile needed)."""
    from torchao.optim.subclass_8bit import OptimState8bit

    import lit_optim

    model = torch.nn.Linear(64, 64)
    opt = lit_optim.build_optimizer(model, "adamw_torch_8bit", lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if p.numel() >= 4096:
            m, v = OptimState8bit.zeros(p.shape, True, 256), OptimState8bit.zeros(p.shape, False, 256)
            m.codes.copy_(torch.randint(0, 256, m.codes.shape, generator=g, dtype=torch.uint8))
            m.scale.copy_(torch.rand(m.scale.shape, generator=g))
        else:
            m, v = torch.randn(p.shape, generator=g), torch.rand(p.shape, generator=g)
        opt.state[p] = {"step": torch.tensor(3.0), "exp_avg": m, "exp_avg_sq": v}
    return model, opt


def test_state_dict_is_plain_and_loads_back_exactly(tmp_path):
    from torchao.optim.subclass_8bit import OptimState8bit

    import lit_optim

    model, opt = _torchao_optimizer_with_state()
    live = {id(v): v for s in opt.state.values() for v in s.values()}
    sd = opt.state_dict()
    # The live state is untouched: still the subclass, the same objects.
    assert {id(v) for s in opt.state.values() for v in s.values()} == set(live)
    assert isinstance(opt.state[model.weight]["exp_avg"], OptimState8bit)
    torch.save(sd, tmp_path / "opt.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / "opt.pt")) == []

    # A callable map_location, as Lightning's and Fabric's loaders pass, is fine with plain tensors.
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True, map_location=lambda storage, loc: storage)
    other_model = torch.nn.Linear(64, 64)
    fresh = lit_optim.build_optimizer(other_model, "adamw_torch_8bit", lr=1e-3)
    fresh.load_state_dict(loaded)
    for p, q in zip(model.parameters(), other_model.parameters()):
        for key, value in opt.state[p].items():
            other = fresh.state[q][key]
            assert type(other) is type(value), key
            if isinstance(value, OptimState8bit):
                assert value.signed == other.signed and value.block_size == other.block_size
                assert all(torch.equal(getattr(value, n), getattr(other, n)) for n in ("codes", "scale", "qmap"))
            else:
                assert torch.equal(value, other)


def test_state_dicts_with_subclasses_still_load():
    """State dicts written before the plain format (the subclasses pickled as they are) load as before."""
    from torchao.optim.subclass_8bit import OptimState8bit

    import lit_optim

    model, opt = _torchao_optimizer_with_state()
    old = from_plain(opt.state_dict())
    assert isinstance(old["state"][0]["exp_avg"], OptimState8bit)
    fresh = lit_optim.build_optimizer(torch.nn.Linear(64, 64), "adamw_torch_8bit", lr=1e-3)
    fresh.load_state_dict(old)
    assert torch.equal(fresh.state[fresh.param_groups[0]["params"][0]]["exp_avg"].codes,
                       opt.state[model.weight]["exp_avg"].codes)


def test_fsdp1_sharded_state_is_left_to_fsdp():
    """FSDP1 gathers the shards of tensor state after `state_dict()`; a plain dict of one shard would escape that."""
    from torchao.optim.subclass_8bit import OptimState8bit

    model, opt = _torchao_optimizer_with_state()
    model.weight._fsdp_flattened = True  # what FSDP1 sets on the parameters it flattened
    assert isinstance(opt.state_dict()["state"][0]["exp_avg"], OptimState8bit)


def test_only_torchao_classes_are_rebuilt():
    """A checkpoint cannot make lit_optim import and call an arbitrary class."""
    _, opt = _torchao_optimizer_with_state()
    sd = to_plain(opt.state_dict())
    sd["state"][0]["exp_avg"][MARK] = "os:system"
    with pytest.raises(ValueError, match="rebuilds only torchao"):
        from_plain(sd)


def test_every_kind_is_named_for_the_issue():
    assert {o["name"] for o in KINDS.values()} >= {"adamw_torch", "adamw_torch_8bit", "adamw_torch_4bit",
                                                   "adamw_8bit", "galore_adamw", "galore_adamw_layerwise"}
