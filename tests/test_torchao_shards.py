"""lit_optim's per-parameter precision choice for torchao's low-bit Adam under FSDP2
(lit_optim/builders/torchao_shards.py); the 2-process run is tests/test_fsdp2_resume.py's (slow)."""

from __future__ import annotations

from lit_optim.builders.torchao_shards import quantize_globally, shard_numels


def test_shards_split_dim0_as_torch_chunk_does():
    assert shard_numels((129, 128), 2) == [65 * 128, 64 * 128]
    assert shard_numels((1, 8192), 2) == [8192, 0]
    assert shard_numels((5, 3), 4) == [6, 6, 3, 0]


def test_one_choice_for_every_rank_from_the_whole_parameter():
    assert quantize_globally((256, 128), 2, 256)  # 8192 a rank, whole blocks
    assert not quantize_globally((129, 128), 2, 256)  # rank 0's 8320 is not whole blocks: fp32 on both ranks
    assert quantize_globally((48, 128), 2, 256)  # 3072 a rank, under torchao's 4096 per shard, but 6144 in all
    assert not quantize_globally((1, 8192), 2, 256)  # an empty shard holds no block
    assert not quantize_globally((16, 128), 2, 256)  # 2048 in all: below 4096


def test_dtensor_steps_keep_the_autograd_cache_out(monkeypatch):
    """The AOTAutograd cache keys a DTensor by its global metadata only, not its shard's shape nor the state subclass
    inside: a torchao optimizer over DTensor parameters steps with that cache off; over plain tensors it is
    untouched."""
    import torch
    import torch._functorch.config as functorch_config
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import lit_optim

    seen = []

    def fake_step(self, closure=None):
        seen.append(functorch_config.enable_autograd_cache)

    plain = lit_optim.build_optimizer(nn.Linear(64, 64), "adamw_torch_8bit", lr=1e-3)
    assert "step" not in vars(plain)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        net = nn.Linear(64, 64)
        fully_shard(net, mesh=init_device_mesh("cpu", (1,)))
        opt = lit_optim.build_optimizer(net, "adamw_torch_4bit", lr=1e-3)
        monkeypatch.setattr(type(opt), "step", fake_step)
        before = functorch_config.enable_autograd_cache
        opt.step()
        assert seen == [False] and functorch_config.enable_autograd_cache == before
    finally:
        dist.destroy_process_group()
    assert torch.is_tensor(next(net.parameters()))
