"""Run a test function on several CPU processes (torch.multiprocessing.spawn, gloo, a FileStore in a tmp dir).

``run_ranks(fn, world, tmp)`` calls ``fn(rank, res)`` in every process after joining the group; ``res`` is a dict
the function fills. Each rank's dict is saved when the function returns or raises (so results before an error
still reach the test, and a rank that raises fails the spawn) and returned in rank order.
"""
from __future__ import annotations

import datetime
import os
from typing import Callable, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn: Callable[[int, Dict], None], world: int, tmp: str, timeout_s: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    res: Dict = {}
    try:
        fn(rank, res)
    finally:
        torch.save(res, os.path.join(tmp, f"rank{rank}.pt"))
        dist.destroy_process_group()


def run_ranks(fn: Callable[[int, Dict], None], world: int, tmp: str, timeout_s: int = 120) -> List[Dict]:
    """``fn(rank, res)`` on ``world`` gloo processes; the ``res`` dicts in rank order."""
    mp.spawn(_entry, args=(fn, world, tmp, timeout_s), nprocs=world, join=True)
    return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def error(fn: Callable[[], object]) -> str:
    """``"Type: message"`` of what ``fn()`` raises, or ``"no error"`` (the test checks type and message)."""
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"
