"""FSDP2 for the built-in task: a strategy where every rank shards, and the sharding applied in `configure_model`.

Lightning's `ModelParallelStrategy` is its FSDP2 engine, but with its defaults ("auto") the devices of one node form
the *tensor*-parallel dimension and the data-parallel (sharding) dimension has size 1, so `fully_shard` over
``device_mesh["data_parallel"]`` shards nothing. `FSDP2Strategy` puts every rank in the data-parallel dimension.
`shard_model` wraps each decoder layer, then the whole model (embeddings, final norm and head: tied weights stay in
one group), the layout FSDP2's documentation recommends so that one layer's parameters are gathered at a time.
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from lit_optim.errors import IncompatibleConfigError


class FSDP2Strategy(ModelParallelStrategy):
    """`ModelParallelStrategy` as plain FSDP2: data-parallel size = world size, no tensor parallelism."""

    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: str | None = None) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.world_size  # known here (nodes x processes); "auto" would mean nodes
        super().setup_environment()


def _layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    inner = getattr(model, "model", None)  # transformers' *ForCausalLM: .model.layers
    for owner in (inner, model):
        for name in ("layers", "blocks"):  # Hugging Face decoders; lit_optim's TinyLM
            layers = getattr(owner, name, None) if owner is not None else None
            if isinstance(layers, torch.nn.ModuleList):
                return list(layers)
    return []


def shard_model(model: torch.nn.Module, device_mesh) -> torch.nn.Module:
    """`fully_shard` each decoder layer and then `model` over the mesh's data-parallel dimension."""
    from torch.distributed.fsdp import fully_shard

    names = device_mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and device_mesh["tensor_parallel"].size() > 1:
        raise IncompatibleConfigError(
            f"ModelParallelStrategy put {device_mesh['tensor_parallel'].size()} devices in its tensor-parallel "
            "dimension, but lit_optim's built-in models are sharded with FSDP2 only (no tensor-parallel plan). Use "
            "trainer=fsdp2 (lit_optim.task.fsdp2.FSDP2Strategy), or set the strategy's data_parallel_size to the "
            "number of devices and tensor_parallel_size=1."
        )
    mesh = device_mesh["data_parallel"] if "data_parallel" in names else device_mesh
    for layer in _layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
