"""CUDA graphs of SVOO reuse-step calls (`SVOOPattern.attention(..., cuda_graph=True)`).

A reuse call (cached clusters, refreshed centroids, new block map, device plan, packed kernel) is a fixed
sequence of about a dozen launches with no host synchronisation, so it can be captured once per clustering and
replayed on later reuse steps. One graph per ``(layer, branch, shape, dtype, device, scale, heads, text tokens)``
and clustering; re-clustering drops the layer's graphs. All graphs of a device share one memory pool and, per
input shape, one set of static q / k / v / out buffers: a replay copies the inputs in and returns a copy of the
output, so extra memory is one call's intermediates plus four ``[B, S, H, D]`` buffers per shape, not per layer.
The profile floors of the step are written into the planner's device buffer before each replay.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["ReuseGraphs"]

log = logging.getLogger("lvsa_kernels")


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    perm: Tensor  # the cached clustering the graph was captured with (its query order)
    inputs: object  # what the graph reads besides the static buffers (kept alive)


class ReuseGraphs:
    """Captured reuse calls of one `SVOOPattern` (see the module docstring)."""

    def __init__(self) -> None:
        self._graphs: Dict[Tuple[object, ...], _Graph] = {}
        self._buffers: Dict[Tuple[object, ...], Tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        self._pools: Dict[int, object] = {}

    def clear(self) -> None:
        self._graphs.clear()
        self._buffers.clear()

    def drop_layer(self, layer: int, branch: Hashable) -> None:
        """Forget the graphs of a (layer, branch) whose clustering changed."""
        for key in [key for key in self._graphs if key[:2] == (layer, branch)]:
            del self._graphs[key]

    def run(self, key: Tuple[object, ...], perm: Tensor, q: Tensor, k: Tensor, v: Tensor,
            call: Callable[[Tensor, Tensor, Tensor], Tensor], before_replay: Callable[[], None],
            state: Callable[[], object]) -> Tensor:
        """Replay (capturing first when needed) ``call(q, k, v)`` for graph ``key`` (starting with layer, branch).

        ``perm``: the cached query order the call reuses (a new clustering means a new capture);
        ``before_replay``: eager work each replay needs first (the step's floors into the planner's buffer);
        ``state``: the tensors a capture reads besides the buffers (the cached clusters), kept alive with it.
        """
        shape = (tuple(q.shape), q.dtype, q.device)
        if shape not in self._buffers:
            self._buffers[shape] = tuple(torch.empty_like(q) for _ in range(4))
        qb, kb, vb, ob = self._buffers[shape]
        for buf, x in ((qb, q), (kb, k), (vb, v)):
            buf.copy_(x)
        before_replay()
        entry = self._graphs.get(key)
        if entry is None or entry.perm is not perm:
            entry = self._capture(key, perm, qb, kb, vb, ob, call, state)
        entry.graph.replay()
        return ob.clone()

    def _capture(self, key, perm, qb, kb, vb, ob, call, state) -> _Graph:
        dev = qb.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up off the capture: lazy imports, Triton compiles, allocator
            call(qb, kb, vb)
        torch.cuda.current_stream(dev).wait_stream(side)
        inputs = state()
        pool = self._pools.setdefault(dev.index, torch.cuda.graph_pool_handle())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            ob.copy_(call(qb, kb, vb))
        log.info("svoo: captured a CUDA graph of the reuse call of layer %r branch %r", key[0], key[1])
        self._graphs[key] = entry = _Graph(graph, perm, inputs)
        return entry


def graph_refusal(q: Tensor, backend: str, precision: str, scale: Optional[float]) -> Optional[str]:
    """Why a reuse call of these inputs cannot be captured, or None."""
    if q.device.type != "cuda":
        return f"q is on {q.device}, CUDA graphs need a CUDA device"
    if backend not in ("triton", "auto"):
        return f"backend={backend!r}: only the Triton cluster path is sync-free"
    if precision != "exact":
        return f"precision={precision!r}: the packed cluster kernel runs 'exact' only"
    if scale is not None and abs(scale) > 1:
        return f"scale={scale!r}: |scale| > 1 checks the inputs on the host (see effective_scale)"
    from .backends import get_backend

    return get_backend("triton").unsupported_permuted_reason(q, q, False)
