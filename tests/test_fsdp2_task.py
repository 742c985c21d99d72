"""`lit_optim.task.fsdp2`: the built-in task's FSDP2 sharding refuses a tensor-parallel mesh it has no plan for
(before any weight is sharded), and finds the decoder layers it wraps one by one."""

from __future__ import annotations

import pytest
import torch

from lit_optim.errors import IncompatibleConfigError
from lit_optim.task.fsdp2 import decoder_layers, shard_model
from lit_optim.task.models import build_model


class _Dim:
    def __init__(self, n: int) -> None:
        self.n = n

    def size(self) -> int:
        return self.n


class _Mesh:
    """The two named dimensions Lightning's ModelParallelStrategy gives configure_model (no process group needed)."""

    mesh_dim_names = ("data_parallel", "tensor_parallel")

    def __init__(self, dp: int, tp: int) -> None:
        self.dims = {"data_parallel": _Dim(dp), "tensor_parallel": _Dim(tp)}

    def __getitem__(self, name: str) -> _Dim:
        return self.dims[name]


def test_a_tensor_parallel_mesh_is_refused_with_the_fix():
    model = build_model({"arch": "tiny"})
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(IncompatibleConfigError, match="tensor-parallel dimension.*trainer=fsdp2"):
        shard_model(model, _Mesh(dp=1, tp=2))
    after = dict(model.named_parameters())
    assert all(type(after[n]) is torch.nn.Parameter and torch.equal(after[n], p) for n, p in before.items())


def test_decoder_layers_are_found_for_per_layer_sharding():
    model = build_model({"arch": "tiny"})
    assert decoder_layers(model) == list(model.blocks) and len(decoder_layers(model)) > 0
    assert decoder_layers(torch.nn.Linear(2, 2)) == []


@pytest.mark.parametrize(("precision", "gathered"), [("bf16-mixed", torch.bfloat16), ("32-true", None)])
def test_the_trainers_mixed_precision_becomes_fsdp2s_policy(tmp_path, precision, gathered):
    """Under `*-mixed` the task shards with FSDP2's mixed precision (16-bit gathered parameters, fp32 reduction), so
    that autocast does not keep a 16-bit copy of every weight on every rank (tests/fsdp2_gathered.py measures it);
    the sharded parameters the optimizer steps stay fp32."""
    import lightning as L
    from harness import TINY_MODEL, make_data

    from lit_optim.task.fsdp2 import FSDP2Strategy
    from lit_optim.task.module import LanguageModelTask

    module = LanguageModelTask(model=TINY_MODEL, optim={"name": "adamw_torch", "lr": 1e-2})
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, strategy=FSDP2Strategy(), precision=precision,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        default_root_dir=str(tmp_path))
    try:
        trainer.fit(module, make_data())
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert trainer.global_step == 2
    for unit in (*module.model.blocks, module.model):
        policy = unit._get_fsdp_state()._mp_policy  # FSDP2 keeps it privately; no public getter
        assert policy.param_dtype == gathered
        assert policy.reduce_dtype == (torch.float32 if gathered else None)
    assert {p.dtype for p in module.model.parameters()} == {torch.float32}
    assert all(s["exp_avg"].dtype == torch.float32 for s in trainer.optimizers[0].state.values())
