"""APOLLO and APOLLO-Mini: train, resume exactly, keep SGD-like state (low-rank moments + one scalar, no stored
projection), and compute the paper's update: channel- or tensor-wise scaling of the raw gradient, norm-growth
limited."""

from __future__ import annotations

import math

import pytest
import torch
from lowrank_support import LOWRANK_HP, assert_state_matches_theory, assert_trains_and_resumes
from torch import nn

import lit_optim
from lit_optim.optimizers.apollo import Apollo
from lit_optim.optimizers.projection import LEFT, RIGHT, initial_seed, next_seed, project, random_factors

CASES = {"apollo_adamw": LOWRANK_HP, "apollo_mini": {"update_proj_gap": 4}}


@pytest.mark.parametrize("name", CASES)
def test_apollo_name_trains_resumes_and_matches_theory(name, tmp_path):
    t1, _, _ = assert_trains_and_resumes({"name": name, "lr": 1e-2, **CASES[name]}, tmp_path)
    opt = t1.optimizers[0]
    assert isinstance(opt, Apollo) and len(opt.targets) == 8
    measured = assert_state_matches_theory(opt)
    rank = 16 if name == "apollo_adamw" else 1
    for p in opt.targets:
        state = opt.state[p]
        # No projection matrix is stored: a seed (int), the step, the limiter's last norm and the low-rank moments.
        assert {k for k, v in state.items() if isinstance(v, torch.Tensor) and v.numel() > 1} == {"exp_avg",
                                                                                                  "exp_avg_sq"}
        assert isinstance(state["proj_seed"], int) and state["proj_last_norm"].numel() == 1
        assert rank in state["exp_avg"].shape
        assert measured[p] <= 2 * 4 * rank * max(p.shape) + 16 + 4


def test_apollo_mini_defaults_are_the_papers():
    spec = lit_optim.get_spec("apollo_mini")
    assert spec.defaults["rank"] == 1 and spec.defaults["scale_type"] == "tensor" and spec.defaults["scale"] == 128
    # 4096 x 4096 weight: 2 moments of a 1 x 4096 projection plus one scalar, vs 8 bytes/param for AdamW.
    assert spec.state_bytes((4096, 4096), {}) == 2 * 4 * 4096 + 4
    assert lit_optim.get_spec("apollo_adamw").state_bytes((1024, 4096), {"rank": 256}) == 2 * 4 * 256 * 4096 + 4


def one_step(scale_type, rank, shape=(12, 40), proj_type="std", seed=3):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(shape))
    opt = Apollo([w], lr=0.1, rank=rank, scale=4.0, scale_type=scale_type, proj_type=proj_type, seed=seed,
                 update_proj_gap=2, inner_kwargs={"eps": 1e-12})
    w0 = w.detach().clone()
    w.grad = torch.randn(shape)
    g = w.grad.clone()
    opt.step()
    return w0, w.detach(), g, opt


@pytest.mark.parametrize("proj_type, side", [("std", LEFT), ("reverse_std", RIGHT)])
def test_channel_wise_scaling_follows_the_paper(proj_type, side):
    """First AdamW step in the projected space is R/|R| elementwise, so the channel scaling is
    s_j = ||sign(R_j)|| / ||R_j|| = sqrt(r) / ||R_j|| and the update is -lr * sqrt(scale) * G * s."""
    w0, w1, g, opt = one_step("channel", rank=4, proj_type=proj_type)
    seed = initial_seed(0 + 3, 0)
    left, right = random_factors(g.shape, 4, side, seed, "cpu")
    r = project(g, left, right)
    dim, view = (0, (1, -1)) if side == LEFT else (1, (-1, 1))
    s = (math.sqrt(4) / r.norm(dim=dim)).view(view)
    assert torch.allclose(w1 - w0, -0.1 * math.sqrt(4.0) * g * s, atol=1e-5)
    assert opt.state[opt.targets[0]]["proj_seed"] == seed


def test_tensor_wise_scaling_is_one_factor():
    w0, w1, g, _ = one_step("tensor", rank=1)
    r = project(g, *random_factors(g.shape, 1, LEFT, initial_seed(3, 0), "cpu"))
    factor = -0.1 * 2.0 * math.sqrt(r.numel()) / r.norm()  # one factor for the whole tensor
    assert torch.allclose(w1 - w0, factor * g, atol=1e-6)


def test_seed_advances_every_gap_and_the_limiter_bounds_norm_growth():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(16, 48))
    opt = Apollo([w], lr=1e-2, rank=2, update_proj_gap=3)
    seeds, norms = [], []
    for t in range(7):
        w.grad = torch.randn_like(w) * (1.0 if t < 3 else 100.0)  # the gradient jumps 100x at step 3
        opt.step()
        seeds.append(opt.state[w]["proj_seed"])
        norms.append(float(opt.state[w]["proj_last_norm"]))
    first = initial_seed(0, 0)
    assert seeds == [first] * 3 + [next_seed(first)] * 3 + [next_seed(next_seed(first))]
    # The scaled gradient's norm may grow by at most 1.01x per step, however large the gradient jump.
    assert all(b <= a * 1.01 * (1 + 1e-5) for a, b in zip(norms, norms[1:])), norms
