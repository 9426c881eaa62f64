"""Count the GPU operations of one SVOO reuse-step call on the CPU (Triton interpreter).

A *launch* is one Triton kernel launch or one aten op that would run a kernel on the GPU (view, alias and
allocation ops such as ``view``, ``expand``, ``empty`` are not counted); *syncs* are the ops that wait for the
GPU on the host (``.item()`` / ``int(t)`` = ``_local_scalar_dense``, ``nonzero`` without a size, ...).
aten ops inside a Triton launch (the interpreter's own copies) are not counted.

    TRITON_INTERPRET=1 python3 bench/op_count.py [--tokens 96 --heads 2 --head-dim 32]
"""
from __future__ import annotations

import argparse
import contextlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCount", "count_ops", "reuse_call_ops"]

_FREE = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "_unsafe_view", "lift_fresh",
         "detach", "set_", "resize_", "is_same_size", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
         "dim", "size", "stride", "numel", "_reshape_alias", "is_contiguous"}
_SYNCS = {"_local_scalar_dense", "nonzero", "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim",
          "masked_select", "repeat_interleave.Tensor", "item", "equal"}


@dataclass
class OpCount:
    """Counts of one traced region: ``aten`` ops by name, ``triton`` launches by kernel name, host ``syncs``."""

    aten: Counter = field(default_factory=Counter)
    triton: Counter = field(default_factory=Counter)
    syncs: Counter = field(default_factory=Counter)

    @property
    def launches(self) -> int:
        """GPU operations: kernel-running aten ops plus Triton launches."""
        return sum(self.aten.values()) + sum(self.triton.values())

    def as_dict(self) -> Dict[str, object]:
        return {"launches": self.launches, "aten_ops": sum(self.aten.values()),
                "triton_launches": sum(self.triton.values()), "syncs": sum(self.syncs.values()),
                "aten": dict(self.aten.most_common()), "triton": dict(self.triton), "sync_ops": dict(self.syncs)}


class _Counter(TorchDispatchMode):
    def __init__(self, count: OpCount) -> None:
        super().__init__()
        self.count = count
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and func.namespace == "aten":  # custom ops: their insides are counted
            name = func.overloadpacket.__name__
            full = f"{name}.{func._overloadname}" if func._overloadname != "default" else name
            if name in _SYNCS or full in _SYNCS:
                self.count.syncs[full] += 1
            if not (func.is_view or name in _FREE):
                self.count.aten[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_ops() -> Iterator[OpCount]:
    """Count the ops run inside the ``with`` block (CPU tensors; Triton kernels in the interpreter)."""
    from triton.runtime import interpreter

    count = OpCount()
    mode = _Counter(count)
    original = interpreter.GridExecutor.__call__

    def launch(self, *args, **kwargs):
        count.triton[getattr(self.fn, "__name__", "kernel")] += 1
        mode.paused += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            mode.paused -= 1

    interpreter.GridExecutor.__call__ = launch
    try:
        with mode:
            yield count
    finally:
        interpreter.GridExecutor.__call__ = original


def reuse_call_ops(tokens: int = 96, heads: int = 2, head_dim: int = 32, q_clusters: int = 4, k_clusters: int = 12,
                   text_tokens: int = 0) -> OpCount:
    """Ops of one `SVOOPattern.attention` reuse-step call (backend "triton", float32 CPU tensors, a profile
    floor) after a re-clustering call filled the cache."""
    from lvsa_kernels import SVOOPattern
    from lvsa_kernels.reference.svoo_profile import SVOOProfile

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, tokens, heads, head_dim, generator=g) for _ in range(3))
    pat = SVOOPattern(profile=SVOOProfile(torch.full((2, 1, heads), 0.2)), top_p=0.8, q_clusters=q_clusters,
                      k_clusters=k_clusters, warmup_steps=0, recluster_every=10**6, clip=(0.0, 1.0))

    def run(step: int) -> None:
        pat.attention(q, k, v, step, 0, backend="triton", text_tokens=text_tokens)

    run(0)  # re-clustering step: fills the cache
    run(1)  # warm every lazy import and cache of the reuse path
    with count_ops() as count:
        run(1)
    return count


def main(argv=None) -> int:
    from lvsa_kernels.triton_src.interpreter import interpreting

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--text-tokens", type=int, default=0)
    args = ap.parse_args(argv)
    if not interpreting():
        ap.error("set TRITON_INTERPRET=1 (the count runs on CPU tensors in Triton's interpreter)")
    count = reuse_call_ops(args.tokens, args.heads, args.head_dim, text_tokens=args.text_tokens)
    print(json.dumps(count.as_dict(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
