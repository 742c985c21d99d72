"""GaLore: every name trains the built-in task, resumes exactly and keeps the state its theory claims; the projection,
target selection, weight decay and inner-state precision do what the paper and Hugging Face's settings say."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from harness import TINY_MODEL
from lowrank_support import LOWRANK_HP, assert_state_matches_theory, assert_trains_and_resumes, fit_must_fail

import lit_optim
from lit_optim.errors import HyperparameterError
from lit_optim.optimizers.projection import (
    FULL,
    LEFT,
    RIGHT,
    add_back_projection,
    project,
    projection_side,
    select_targets,
    svd_factors,
)
from lit_optim.param_groups import classify
from lit_optim.task.tiny_lm import TinyLM

# name -> hyperparameters for the 12-step test. torchao names use rank 64 (the tiny model's width): the projected
# shapes are then the model's own, whose compiled torchao step other tests have already built.
CASES = {
    "galore_adamw": LOWRANK_HP,
    "galore_adamw_8bit": LOWRANK_HP,
    "galore_adafactor": LOWRANK_HP,
    "galore": {**LOWRANK_HP, "inner": "adamw_torch", "inner_kwargs": {"betas": (0.9, 0.95)}},
    "galore_adamw_torch_8bit": {"rank": 64, "update_proj_gap": 4},
    "galore_adamw_4bit": {"rank": 64, "update_proj_gap": 4},
}
SLOW = {"galore_adamw_torch_8bit", "galore_adamw_4bit"}  # torchao compiles its step per shape on first use
STEPS = 8  # checkpoint at 4 (a projector refresh), resume, continue to 8


def tiny() -> TinyLM:
    torch.manual_seed(0)
    cfg = {k: v for k, v in TINY_MODEL.items() if k != "arch"}
    return TinyLM(**cfg)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CASES])
def test_galore_name_trains_resumes_and_matches_theory(name, tmp_path):
    optim = {"name": name, "lr": 1e-2, **CASES[name]}
    t1, _, _ = assert_trains_and_resumes(optim, tmp_path, steps=STEPS)
    opt = t1.optimizers[0]
    assert type(opt).__name__ == "GaLore"
    assert len(opt.targets) == 8  # qkv, proj, up, down of both blocks
    measured = assert_state_matches_theory(opt)
    # The point of GaLore: at rank <= min(m, n)/4 targets keep far less than fp32 AdamW on the full weight. (Against
    # its own 8-bit inner on the full weight it can lose at small ranks: a projection under 4096 elements gets 32-bit
    # state -- see test_8bit_inner_precision_depends_on_the_projected_size.)
    for p in opt.targets:
        if 4 * CASES[name]["rank"] <= min(p.shape):
            assert measured[p] < 8 * p.numel() * 0.75, (tuple(p.shape), measured[p])
    # Projector state is plain tensors, stored under the real parameter.
    state = opt.state[opt.targets[0]]
    assert state["proj_step"] == STEPS
    assert any(k in state for k in ("proj_left", "proj_right"))


def test_galore_theory_is_the_papers_count():
    """m x n target (m <= n), rank r: m*r projector + 2*n*r moments elements, vs 2*m*n for AdamW."""
    spec = lit_optim.get_spec("galore_adamw")
    m, n, r = 1024, 4096, 128
    assert spec.state_bytes((m, n), {"rank": r}) == 4 * (m * r + 2 * n * r)
    assert spec.state_bytes((n, m), {"rank": r}) == 4 * (m * r + 2 * n * r)  # "std" projects the larger side away
    assert spec.state_bytes((m, n), {"rank": r, "proj_type": "reverse_std"}) == 4 * (n * r + 2 * m * r)
    assert spec.state_bytes((m, n), {"rank": r, "proj_type": "full"}) == 4 * (m * r + r * n + 2 * r * r)
    assert spec.state_bytes((m,), {}) == 4 * 2 * m  # 1-D tensors: the inner optimizer's own state
    assert spec.bytes_per_param() == pytest.approx(4 * (4096 * 128 + 2 * 4096 * 128) / 4096**2)  # HF rank 128


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_projection_sides_and_round_trip(proj_type):
    torch.manual_seed(0)
    g = torch.randn(24, 40)
    side = projection_side(g.shape, proj_type)
    assert side == {"std": LEFT, "reverse_std": RIGHT}.get(proj_type, proj_type)
    left, right = svd_factors(g, 24, side)  # full rank: projecting and projecting back is the identity
    r = project(g, left, right)
    expected = {LEFT: (24, 40), RIGHT: (24, 24), FULL: (24, 24)}[side]
    assert tuple(r.shape) == expected
    w = torch.zeros_like(g)
    add_back_projection(w, r, left, right, alpha=1.0)
    assert torch.allclose(w, g, atol=1e-4)
    # Low rank keeps the top singular directions: the best rank-4 approximation of g (Eckart-Young).
    left4, right4 = svd_factors(g, 4, side)
    w4 = torch.zeros_like(g)
    add_back_projection(w4, project(g, left4, right4), left4, right4, alpha=1.0)
    u, s, vh = torch.linalg.svd(g)
    if side != FULL:
        assert torch.allclose(w4, u[:, :4] @ torch.diag(s[:4]) @ vh[:4], atol=1e-4)


@pytest.mark.parametrize("shape", [(48, 160), (160, 48)])
def test_gram_eigh_gives_the_svd_subspace(shape):
    # A gradient-like matrix: a decaying spectrum, so the top-8 subspace is well defined.
    torch.manual_seed(0)
    m, n = shape
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n)))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n)))
    s = torch.logspace(0, -3, min(m, n))
    g = (u * s) @ v.t()
    side = projection_side(shape, "std")
    fast = next(f for f in svd_factors(g, 8, side, "gram_eigh") if f is not None)
    exact = next(f for f in svd_factors(g, 8, side, "svd") if f is not None)
    assert fast.shape == exact.shape == ((m, 8) if side == LEFT else (8, n))
    # Same subspace: the projectors P Pᵀ agree (singular vectors are only defined up to sign).
    outer = (lambda f: f @ f.t()) if side == LEFT else (lambda f: f.t() @ f)
    assert torch.allclose(outer(fast), outer(exact), atol=1e-4)


@pytest.mark.parametrize("magnitude", [1e-25, 1e20])
def test_gram_eigh_survives_gradients_too_small_or_large_to_square(magnitude):
    # (1e-25)^2 underflows fp32 and (1e20)^2 overflows it: the Gram route scales first, and leaves the user's
    # matmul-precision setting as it found it.
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(48, 48))
    v, _ = torch.linalg.qr(torch.randn(160, 48))
    g = (u * torch.logspace(0, -3, 48)) @ v.t() * magnitude
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        fast, _ = svd_factors(g, 8, LEFT, "gram_eigh")
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)
    exact, _ = svd_factors(g, 8, LEFT, "svd")
    assert torch.isfinite(fast).all()
    assert torch.allclose(fast @ fast.t(), exact @ exact.t(), atol=1e-4)


def test_svd_method_is_checked_used_and_survives_older_checkpoints(monkeypatch):
    from lit_optim.optimizers import galore

    model = tiny()
    with pytest.raises(HyperparameterError, match="svd_method must be one of gram_eigh, svd"):
        lit_optim.build_optimizer(model, "galore_adamw", svd_method="qr")
    opt = lit_optim.build_optimizer(model, "galore_adamw", rank=8)
    assert {g["svd_method"] for g in opt.param_groups} == {"gram_eigh"}

    used = []
    monkeypatch.setattr(galore, "svd_factors", lambda *a: used.append(a[3]) or svd_factors(*a))
    tokens = torch.randint(0, 256, (4, 17))

    def step(o):
        F.cross_entropy(model(tokens[:, :-1]).reshape(-1, 256), tokens[:, 1:].reshape(-1)).backward()
        o.step()
        o.zero_grad()

    step(opt)
    assert used and set(used) == {"gram_eigh"}
    # A state dict saved before svd_method existed has groups without it: it loads, and the configured method stays.
    saved = opt.state_dict()
    for g in saved["param_groups"]:
        del g["svd_method"]
        g["update_proj_gap"] = 1  # refresh at the next step
    resumed = lit_optim.build_optimizer(model, "galore_adamw", rank=8, svd_method="svd")
    resumed.load_state_dict(saved)
    used.clear()
    step(resumed)
    assert used and set(used) == {"svd"}


def test_projector_refreshes_every_update_proj_gap_steps():
    model = tiny()
    opt = lit_optim.build_optimizer(model, "galore_adamw", lr=1e-2, rank=8, update_proj_gap=3)
    w = model.blocks[0].up.weight  # 256 x 64: "std" projects from the right
    tokens = torch.randint(0, 256, (4, 17))
    seen = []
    for _ in range(7):
        F.cross_entropy(model(tokens[:, :-1]).reshape(-1, 256), tokens[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
        seen.append(opt.state[w]["proj_right"].clone())
    assert opt.state[w]["exp_avg"].shape == (256, 8)
    changed = [not torch.equal(a, b) for a, b in zip(seen, seen[1:])]
    assert changed == [False, False, True, False, False, True]  # new SVD at steps 3 and 6 (0-based)


def test_targets_follow_hugging_face_optim_target_modules():
    model = tiny()
    infos, _, _ = classify(model)
    names = {id(i.param): i.name for i in infos}

    def chosen(tm):
        return sorted(names[k] for k in select_targets(infos, model, tm))

    default = chosen(None)
    assert default == chosen("all-linear")
    assert default == sorted(f"blocks.{b}.{m}.weight" for b in (0, 1) for m in ("qkv", "proj", "up", "down"))
    assert chosen(r"blocks\.0\..*") == [f"blocks.0.{m}.weight" for m in ("down", "proj", "qkv", "up")]
    assert chosen(["qkv"]) == ["blocks.0.qkv.weight", "blocks.1.qkv.weight"]
    assert chosen(["lm_head", "up"]) == ["blocks.0.up.weight", "blocks.1.up.weight", "lm_head.weight"]
    with pytest.raises(HyperparameterError, match="not nn.Linear"):
        chosen(["embed"])
    with pytest.raises(HyperparameterError, match="matches no nn.Linear"):
        chosen(["attention"])


def test_weight_decay_is_kept_and_decoupled_on_the_full_weight():
    """Non-targets keep their param groups' decay; targets decay the full weight: W *= 1 - lr*wd, independent of the
    projected update. Compare one step with and without weight decay from the same start."""
    lr, wd = 1e-2, 0.5
    tokens = torch.randint(0, 256, (4, 17))
    results = []
    for decay in (0.0, wd):
        model = tiny()
        opt = lit_optim.build_optimizer(model, "galore_adamw", lr=lr, weight_decay=decay, rank=8)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        F.cross_entropy(model(tokens[:, :-1]).reshape(-1, 256), tokens[:, 1:].reshape(-1)).backward()
        opt.step()
        results.append((model, before, opt))
    (m0, before, _), (m1, _, opt) = results
    decay_names = {n for g in opt.lit_optim.plan.groups if g["name"] == "decay" for n in opt.lit_optim.plan.names(g)}
    assert "embed.weight" in decay_names and "blocks.0.up.weight" in decay_names
    for (n, p0), (_, p1) in zip(m0.named_parameters(), m1.named_parameters()):
        expected = -lr * wd * before[n] if n in decay_names else torch.zeros_like(p0)
        assert torch.allclose(p1 - p0, expected, atol=1e-6), n
    # The inner optimizer never decays the low-rank stand-ins.
    for p in opt.targets:
        assert opt.settings_for(p)["weight_decay"] == 0.0


def test_8bit_inner_precision_depends_on_the_projected_size():
    """bitsandbytes keeps 32-bit state for tensors under 4096 elements: at rank 16, up (256x64 -> 256x16) and down
    (64x256 -> 16x256) projections get 8-bit moments, qkv (192x16) and proj (64x16) stay 32-bit."""
    model = tiny()
    opt = lit_optim.build_optimizer(model, "galore_adamw_8bit", lr=1e-2, rank=16)
    tokens = torch.randint(0, 256, (4, 17))
    F.cross_entropy(model(tokens[:, :-1]).reshape(-1, 256), tokens[:, 1:].reshape(-1)).backward()
    opt.step()
    def per_element(p):  # bytes of the inner state per projected element (projector entries excluded)
        inner, shadow = opt.optimizer_for(p)
        state = inner.state[shadow]
        inner_bytes = sum(v.untyped_storage().nbytes() for k, v in state.items()
                          if isinstance(v, torch.Tensor) and not k.startswith(opt.own_prefix) and v.numel() > 1)
        return inner_bytes / shadow.numel()

    blocks = model.blocks[0]
    assert opt.projected_shape(blocks.up.weight) == (256, 16)
    assert opt.projected_shape(blocks.down.weight) == (16, 256)
    for p in (blocks.up.weight, blocks.down.weight):
        assert 2.0 <= per_element(p) < 2.6  # uint8 codes + block scales (+ shared maps)
        assert opt.state[p]["state1"].dtype == torch.uint8
    for p in (blocks.qkv.weight, blocks.proj.weight):
        assert per_element(p) == pytest.approx(8.0, abs=0.02)  # fp32 m and v
        assert opt.state[p]["state1"].dtype == torch.float32
    # The embedding (a non-target) keeps 32-bit state, as Hugging Face does for 8-bit optimizers.
    assert opt.state[model.embed.weight]["state1"].dtype == torch.float32
    assert opt.state[model.lm_head.weight]["state1"].dtype == torch.uint8
    assert_state_matches_theory(opt)


@pytest.mark.parametrize("inner, reason", [
    ("lamb_8bit", "trust ratio"), ("adafactor_torch", "adafactor_hf"), ("schedule_free_adamw", "schedule-free"),
    ("muon", "composite"),
])
def test_inner_optimizers_that_read_the_parameter_are_refused_before_step_1(inner, reason, tmp_path):
    fit_must_fail({"name": "galore", "lr": 1e-2, "inner": inner}, HyperparameterError, tmp_path, match=reason)


def test_a_name_fixes_its_inner_optimizer():
    with pytest.raises(HyperparameterError, match="fixes inner"):
        lit_optim.build_optimizer(tiny(), "galore_adamw", inner="adamw_bnb_8bit")
    with pytest.raises(HyperparameterError, match="inner_kwargs"):
        lit_optim.build_optimizer(tiny(), "galore", betas=(0.9, 0.95))


@pytest.mark.parametrize("name, hp", [("galore_adamw_8bit", {"rank": 8}), ("adamw_bnb_8bit", {"in_backward": True})])
def test_bnb_sub_optimizers_share_one_quantization_map_dict(name, hp):
    # bitsandbytes moves its maps to the parameter's device on the first step by replacing the entries of its
    # `name2qmap` dict; sub-optimizers holding the same dict object make one device copy, not one each (found on an
    # H200: 2 KiB more per GaLore target than one optimizer keeps).
    from lit_optim.nesting import leaves as _leaves

    opt = lit_optim.build_optimizer(tiny(), name, lr=1e-3, **hp)
    leaves = [o for o in _leaves(opt.lit_optim_inner_optimizers()) if getattr(o, "name2qmap", None)]
    assert len(leaves) > 1
    assert len({id(o.name2qmap) for o in leaves}) == 1
    leaves[0].name2qmap["dynamic"] = leaves[0].name2qmap["dynamic"].clone()  # what `.to(device)` does on a GPU
    assert all(o.name2qmap["dynamic"] is leaves[0].name2qmap["dynamic"] for o in leaves)


def test_loaded_bnb_state_shares_the_quantization_maps_again():
    # A checkpoint holds the maps once per parameter; after loading, every state points at the shared tables again.
    from lit_optim.nesting import leaves as _leaves

    model = tiny()
    opt = lit_optim.build_optimizer(model, "galore_adamw_8bit", rank=16)
    tokens = torch.randint(0, 256, (4, 17))
    F.cross_entropy(model(tokens[:, :-1]).reshape(-1, 256), tokens[:, 1:].reshape(-1)).backward()
    opt.step()
    saved = opt.state_dict()
    for state in saved["state"].values():  # what torch.load gives: separate tensors
        for key in [k for k in state if k.startswith("qmap")]:
            state[key] = state[key].clone()
    resumed = lit_optim.build_optimizer(model, "galore_adamw_8bit", rank=16)
    resumed.load_state_dict(saved)
    tables = [t for s in resumed.state.values() for k, t in s.items() if k.startswith("qmap")]
    assert len(tables) >= 4 and len({t.data_ptr() for t in tables}) == 2  # signed and unsigned map, once each
    maps = {id(t) for o in _leaves(resumed.lit_optim_inner_optimizers()) if getattr(o, "name2qmap", None)
            for t in o.name2qmap.values()}
    assert {id(t) for t in tables} <= maps
