"""The process group the FSDP2 test workers share: gloo over CPU ranks on this host, and its 1-D device mesh."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch.distributed as dist


@contextlib.contextmanager
def gloo_mesh(rank: int, world: int, default_port: str) -> Iterator:
    """Join a `world`-rank gloo group as `rank` and yield its 1-D CPU mesh; the group is destroyed on the way out.
    The rendezvous port is GLOO_TEST_PORT (the tests pick a free one), else `default_port`.

    On a normal exit every rank meets at a barrier before tearing down: a rank that destroys its gloo pairs while
    its peer is still inside the last collective can abort the peer ("terminate called without an active
    exception", seen once on a loaded CI machine). After an error the barrier is skipped, so a failing rank
    cannot hang waiting for one that will never arrive."""
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("GLOO_TEST_PORT", default_port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield init_device_mesh("cpu", (world,))
        dist.barrier()
    finally:
        dist.destroy_process_group()
