"""FSDP1 -- Lightning's FSDPStrategy (`strategy="fsdp"`), `FullyShardedDataParallel(use_orig_params=True)` -- on two
CPU processes (gloo); tests/fsdp1_consistency.py does the runs.

FSDP1 flattens each wrapped module's parameters and hands the optimizer every parameter as a 1-D slice of its rank's
part. Only an elementwise update with state shaped like the parameter steps a slice as it would the whole tensor, and
only such state goes through FSDP1's optimizer state dict (every Lightning checkpoint calls it). The names that claim
FSDP1 are exactly those; here each one, built by the LightningModule's own `configure_optimizers` inside the wrapper
as Lightning builds it, steps like one process and resumes exactly through both of Lightning's `state_dict_type`s.
Weight decay goes by each parameter's own shape, not its slice's. Every other name is refused before step 1
(tests/test_support_matrix.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from harness import free_port, fsdp1_trainer, read_rank_results, run_gloo_ranks
from torch import nn

from lit_optim.errors import HyperparameterError
from lit_optim.registry import get_spec, list_optimizers
from lit_optim.spec import FSDP1

# The names that may claim FSDP1: elementwise updates, state shaped like the parameter. A spec that claims it and is
# not here fails the first test: add it, and the second test runs it.
ELEMENTWISE = ["adamw_torch", "adamw_torch_fused", "adam", "sgd", "adagrad", "rmsprop", "schedule_free_adamw",
               "schedule_free_radam", "schedule_free_sgd"]


def test_fsdp1_is_claimed_only_by_elementwise_names():
    claiming = [n for n in list_optimizers() if FSDP1 in get_spec(n).supports]
    assert sorted(claiming) == sorted(ELEMENTWISE)


def test_fsdp1_steps_like_one_process_and_resumes_exactly(tmp_path):
    out = tmp_path / "fsdp1.json"
    run_gloo_ranks(Path(__file__).resolve().parent / "fsdp1_consistency.py", str(out), *ELEMENTWISE, cwd=tmp_path,
                   timeout=400)
    results = read_rank_results(out)
    for name in ELEMENTWISE:
        r = results[name]
        assert "error" not in r, (name, r)
        assert r["moved"] > 1e-4, (name, r)  # the comparison below means something
        assert r["decay_mismatches"] == [], (name, r["decay_mismatches"])
        # Without the weights' decay (their 1-D slices taken for biases) this was 5e-4 for AdamW, 6e-2 for Adam.
        assert max(r["sharded_vs_one_process"]) < 1e-5, (name, r)
        assert r["resume"] == {"full": 0.0, "sharded": 0.0}, (name, r["resume"])


@pytest.fixture
def one_rank_group():
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def wrap(use_orig_params: bool):
    from torch.distributed.fsdp import FullyShardedDataParallel

    inner = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    return inner, FullyShardedDataParallel(inner, device_id=torch.device("cpu"), use_orig_params=use_orig_params)


def test_fsdp1_flat_parameters_are_refused_with_the_fix(one_rank_group):
    import lit_optim

    _, root = wrap(use_orig_params=False)
    with pytest.raises(HyperparameterError, match="use_orig_params=True"):
        lit_optim.build_optimizer(root, "adamw_torch", lr=1e-3, weight_decay=0.1)


def test_fsdp1_inner_module_needs_the_wrappers_shapes(one_rank_group):
    """The module inside the wrapper (what a LightningModule is under FSDPStrategy) cannot see the shapes FSDP1
    flattened: refused rather than guessed, and built right with them (the mixin passes them itself)."""
    import lit_optim
    from lit_optim.param_groups import fsdp1_shapes

    inner, root = wrap(use_orig_params=True)
    with pytest.raises(HyperparameterError, match="fsdp1_shapes"):
        lit_optim.build_optimizer(inner, "adamw_torch", lr=1e-3, weight_decay=0.1)
    opt = lit_optim.build_optimizer(inner, "adamw_torch", lr=1e-3, weight_decay=0.1,
                                    original_shapes=fsdp1_shapes(root))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] for p in g["params"]}
    assert decayed == {id(inner[0].weight)}


def test_fsdp1_refuses_clipping_by_norm_before_step_1():
    """Lightning's FSDP1 precision plugin refuses norm clipping only when it first clips, after a forward and
    backward; lit_optim says so before step 1. Clipping by value is Lightning's own and passes."""
    from lit_optim.errors import IncompatibleConfigError
    from lit_optim.mixin import check_trainer_compatibility

    def trainer(algorithm):
        return fsdp1_trainer(gradient_clip_val=1.0, gradient_clip_algorithm=algorithm)

    for algorithm in (None, "norm"):
        with pytest.raises(IncompatibleConfigError, match="cannot clip gradients by norm.*trainer=fsdp2"):
            check_trainer_compatibility(get_spec("adamw_torch"), trainer(algorithm), "cuda")
    check_trainer_compatibility(get_spec("adamw_torch"), trainer("value"), "cuda")

