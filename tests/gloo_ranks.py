"""One rank of a gloo process group in a forked test process: the set-up of every 2-rank test without Ray."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist


@contextmanager
def gloo_rank(rank: int, world: int, init_file: str, timeout_s: float = 120) -> Iterator[None]:
    """Join the group as ``rank`` on one torch thread (the ranks share a 2-core machine); leave it on exit."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()
