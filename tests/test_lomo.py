"""LOMO and AdaLomo: the update fused into backward -- train, resume exactly, keep their theoretical state (none;
row + column statistics), and equal the normal-step algorithm they fuse."""

from __future__ import annotations

import pytest
import torch
from harness import run_task
from lowrank_support import GradProbe, assert_state_matches_theory, assert_trains_and_resumes

from lit_optim.optimizers.lomo import AdaLomo, Lomo

CASES = {"lomo": 0.5, "adalomo": 5e-2}


@pytest.mark.parametrize("name", CASES)
def test_lomo_name_trains_resumes_and_matches_theory(name, tmp_path):
    probe = GradProbe()
    t1, _, _ = assert_trains_and_resumes({"name": name, "lr": CASES[name]}, tmp_path, callbacks=[probe])
    opt = t1.optimizers[0]
    assert isinstance(opt, Lomo if name == "lomo" else AdaLomo)
    # Gradients freed in backward (the probe saw the straight run, 8 steps, and the resumed one, 4).
    assert probe.grads_alive == [0] * 12 and probe.max_alive_in_backward <= 1
    measured = assert_state_matches_theory(opt)
    if name == "lomo":
        assert sum(measured.values()) == 0
    else:  # a matrix keeps one row and one column vector
        w = t1.lightning_module.model.blocks[0].up.weight
        assert set(opt.state[w]) == {"step", "exp_avg_sq_row", "exp_avg_sq_col"}
        assert measured[w] == 4 * sum(w.shape)


@pytest.mark.parametrize("name, normal", [("lomo", {"name": "sgd"}),
                                          ("adalomo", {"name": "adafactor_hf", "scale_parameter": True})])
def test_fused_update_equals_the_normal_step(name, normal):
    lr = CASES[name]
    fused, _, _ = run_task({"name": name, "lr": lr}, 4)
    plain, _, _ = run_task({**normal, "lr": lr}, 4)
    for a, b in zip(fused.parameters(), plain.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_adafactor_hf_trains_resumes_and_matches_theory(tmp_path):
    """The absolute-lr Adafactor that galore_adafactor and AdaLomo step with, as a registry name of its own."""
    t1, _, _ = assert_trains_and_resumes({"name": "adafactor_hf", "lr": 1e-2}, tmp_path)
    assert_state_matches_theory(t1.optimizers[0])
