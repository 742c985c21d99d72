"""`lit_optim.task.fsdp2`: the built-in task's FSDP2 sharding refuses a tensor-parallel mesh it has no plan for
(before any weight is sharded), and finds the decoder layers it wraps one by one."""

from __future__ import annotations

import pytest
import torch

from lit_optim.errors import IncompatibleConfigError
from lit_optim.task.fsdp2 import _layers, shard_model
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
    assert _layers(model) == list(model.blocks) and len(_layers(model)) > 0
    assert _layers(torch.nn.Linear(2, 2)) == []
