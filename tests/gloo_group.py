"""The process group the FSDP test workers share: gloo over CPU ranks on this host, and its 1-D device mesh."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch.distributed as dist


@contextlib.contextmanager
def gloo_mesh(rank: int, world: int, default_port: str) -> Iterator:
    """Join a `world`-rank gloo group as `rank` and yield its 1-D CPU mesh; the group is destroyed on the way out.
    The rendezvous port is GLOO_TEST_PORT (the tests pick a free one), else `default_port`.

    On a normal exit every rank meets at a barrier before tearing down, so that no rank leaves (end_rank) while a
    peer still waits on it inside the last collective. After an error the barrier is skipped, so a failing rank
    cannot hang waiting for one that will never arrive."""
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("GLOO_TEST_PORT", default_port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield init_device_mesh("cpu", (world,))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def write_results(out: str, rank: int, results: dict) -> None:
    """Rank 0's results go to `out`, every other rank's to `out`.rank{r}: an error caught on one rank only must reach
    the test too (tests/harness.py `read_rank_results`)."""
    import json
    from pathlib import Path

    Path(out if rank == 0 else f"{out}.rank{rank}").write_text(json.dumps(results))


def end_rank() -> None:
    """End this rank's process now, with exit code 0, skipping the interpreter's finalization; call it last, once
    the results are written.

    destroy_process_group only drops the Python references: the device mesh (and the FSDP state that cached it)
    can keep the gloo group alive into finalization, and a gloo worker thread that then frees a tensor needs the
    GIL of an interpreter being torn down; the thread is unwound, and the C++ runtime aborts the rank
    ("terminate called without an active exception"). CI machines saw it twice, the second time with the barrier
    above in place. Leaving with os._exit leaves nothing of the test to finalization."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
