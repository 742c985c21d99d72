"""FSDP2 for the built-in task: a strategy where every rank shards, and the sharding applied in `configure_model`.

Lightning's `ModelParallelStrategy` is its FSDP2 engine, but with its defaults ("auto") the devices of one node form
the *tensor*-parallel dimension and the data-parallel (sharding) dimension has size 1, so `fully_shard` over
``device_mesh["data_parallel"]`` shards nothing. `FSDP2Strategy` puts every rank in the data-parallel dimension.
`shard_model` wraps each decoder layer, then the whole model (embeddings, final norm and head: tied weights stay in
one group), the layout FSDP2's documentation recommends so that one layer's parameters are gathered at a time, with
FSDP2's mixed-precision policy under a ``*-mixed`` Trainer precision (`mixed_precision_policy` says why).
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


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers `shard_model` wraps one by one (none found: only the whole model is wrapped)."""
    inner = getattr(model, "model", None)  # transformers' *ForCausalLM: .model.layers
    for owner in (inner, model):
        for name in ("layers", "blocks"):  # Hugging Face decoders; lit_optim's TinyLM
            layers = getattr(owner, name, None) if owner is not None else None
            if isinstance(layers, torch.nn.ModuleList):
                return list(layers)
    return []


def mixed_precision_policy(precision: str | None):
    """FSDP2's own mixed precision for a Trainer's `precision`: parameters gathered in the 16-bit type, gradients
    reduced in fp32; None for the others.

    Under ``*-mixed`` Lightning also runs the forward in autocast, which casts each fp32 weight to 16 bits and keeps
    the copy for backward. FSDP2 frees the gathered parameters after each layer, but not those copies: without this
    policy every rank would hold the whole model again at 2 bytes a parameter (for 8B, 15 GiB a rank, whatever the
    number of ranks). With it the layers compute on FSDP2's 16-bit parameters, which it frees, and autocast has
    nothing left to copy."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype is not None else None


def shard_model(model: torch.nn.Module, device_mesh, precision: str | None = None) -> torch.nn.Module:
    """`fully_shard` each decoder layer and then `model` over the mesh's data-parallel dimension, with FSDP2's mixed
    precision for the Trainer's `precision` (`mixed_precision_policy`)."""
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
    policy = mixed_precision_policy(precision)
    options = {"mp_policy": policy} if policy is not None else {}
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, **options)
    fully_shard(model, mesh=mesh, **options)
    return model
