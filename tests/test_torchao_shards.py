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
