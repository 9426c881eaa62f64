"""Backend choice for `block_sparse_attn`: explicit override, environment override, or measured auto.

``backend="auto"`` (the default of `block_sparse_attn`):

* a fully dense layout runs on dense SDPA (``sdpa``) when it can; with ``return_lse=True`` SDPA cannot,
  so the choice falls through to the backends below;
* otherwise every eligible backend for the tensors' device type is timed once on the real tensors
  (`measure`: warm-up, then the median of a few runs; CUDA events on CUDA, ``perf_counter`` elsewhere)
  and the fastest wins. Winners are cached per problem class (`problem_key`) in memory and in a JSON
  file (`cache_file`), so a later process reads the choice instead of timing again;
* a candidate that would first compile something (`Backend.build_needed`, e.g. a FlashInfer JIT module)
  is not timed while a ready candidate exists (WARNING once, naming what it would build);
* ``reference`` is only used when nothing else is eligible;
* inside ``torch.compile`` tracing nothing is timed: the cached winner, else the first eligible
  backend in `PREFERENCE` order, is used;
* a skipped backend is logged once at WARNING with the reason.

A permuted `AttentionPlan` (SVOO) is chosen for the same way: eligibility from the tensors alone
(`Backend.unsupported_permuted_reason`), timing of `Backend.run_permuted` (Triton's cluster kernel, or the
per-batch host layouts on permuted tokens for every other backend), one cache entry per problem class.

``precision`` other than ``"exact"`` (the 8-bit modes) only considers backends whose capabilities list it
(dense SDPA and ``reference`` do not), is part of the cache key, and raises `BackendUnavailable` when none
can run it: ``auto`` never changes the precision by itself.

Inputs that require grad (autograd enabled) only consider backends with a backward (`Capabilities.backward`:
``triton``, ``sdpa`` for dense layouts, ``reference``) at precision ``"exact"``; an explicit backend without one
raises `BackendUnavailable` saying so, so a gradient is never silently missing or wrong.

Overrides: the ``backend=`` argument, or the environment variable ``LVSA_KERNELS_BACKEND`` (read when
the argument is ``"auto"``). An explicit backend that cannot run raises `BackendUnavailable`.
The cache folder is ``~/.cache/lvsa_kernels`` unless ``LVSA_KERNELS_CACHE_DIR`` names another one.

`timed_choice` (`lvsa_kernels.choice`) is the measurement hook shared with backends that pick among their
own variants (the NPU backend chooses between two torch_npu ops with it).
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Tuple, Union

from torch import Tensor

from .backends import BackendUnavailable, get_backend, registered_backends
from .backends.base import Backend, needs_grad
from .choice import (  # noqa: F401  (ENV_CACHE_DIR, cache_file, cached_choices, reset_state: re-exported)
    ENV_CACHE_DIR, _warn_once, _warn_skip, cache_file, cached_choices, problem_key, reset_state, timed_choice,
)
from .reference.layout import BlockSparseLayout
from .reference.plan import AttentionPlan

__all__ = [
    "ENV_BACKEND", "ENV_CACHE_DIR", "PREFERENCE", "select_backend", "run_on", "candidate_order", "problem_key",
    "timed_choice", "cache_file", "cached_choices", "reset_state", "has_work",
]

ENV_BACKEND = "LVSA_KERNELS_BACKEND"

# Static preference among sparse backends (used untimed, e.g. while torch.compile traces).
PREFERENCE = ("triton", "flashinfer", "npu")
_DENSE = "sdpa"
_FALLBACK = "reference"


# ---------------------------------------------------------------------------------------- selection
def candidate_order(device_type: str) -> List[str]:
    """Sparse backends that run on ``device_type`` tensors, in preference order (then registration order).

    ``sdpa`` (dense layouts only) and ``reference`` (last resort) are handled separately by `select_backend`.
    """
    backends = registered_backends()
    names = [n for n in PREFERENCE if n in backends]
    names += [n for n in backends if n not in names and n not in (_DENSE, _FALLBACK)]
    return [n for n in names if device_type in backends[n].caps.devices]


def _reason(backend: Backend, q: Tensor, k: Tensor, v: Tensor, layout: Union[BlockSparseLayout, AttentionPlan],
            return_lse: bool, precision: str = "exact") -> Optional[str]:
    reason = backend.precision_reason(precision, q)
    if reason:
        return reason
    if needs_grad(q, k, v):
        if not backend.caps.backward:
            return "has no backward (q, k or v requires grad); use backend 'triton' or 'reference', or no_grad"
        if precision != "exact":
            return f"precision={precision!r} has no backward (q, k or v requires grad); use precision='exact'"
    if isinstance(layout, AttentionPlan):
        return backend.unsupported_permuted_reason(q, k, return_lse)
    return backend.unsupported_reason(q, k, layout, return_lse)


def run_on(backend: Backend, q: Tensor, k: Tensor, v: Tensor, layout: Union[BlockSparseLayout, AttentionPlan],
           scale: float, return_lse: bool, precision: str = "exact") -> Tuple[Tensor, Optional[Tensor]]:
    """``backend.run`` for a layout, ``backend.run_permuted`` for a permuted plan, at ``precision`` (passed only
    when not ``"exact"``: only 8-bit backends take it)."""
    extra = {} if precision == "exact" else {"precision": precision}
    if isinstance(layout, AttentionPlan):
        return backend.run_permuted(q, k, v, layout, scale, return_lse, **extra)
    return backend.run(q, k, v, layout, scale, return_lse, **extra)


def _explicit(name: str, source: str, q: Tensor, k: Tensor, v: Tensor,
              layout: Union[BlockSparseLayout, AttentionPlan], return_lse: bool, precision: str) -> Backend:
    try:
        backend = get_backend(name)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    reason = _reason(backend, q, k, v, layout, return_lse, precision)
    if reason:
        raise BackendUnavailable(f"backend {name!r} ({source}) cannot run these inputs: {reason}")
    return backend


def _needs_build(name: str, backend: Backend, q: Tensor, layout: Union[BlockSparseLayout, AttentionPlan]) -> bool:
    """Whether ``backend`` would compile something first; such a candidate is not timed (logged once)."""
    what = backend.build_needed(q, layout) if isinstance(layout, BlockSparseLayout) else None
    if what:
        _warn_once(f"not timing backend {name!r}: its first run would JIT-build {what}; run it once explicitly "
                   f"(backend={name!r}) to build, after which auto measures it")
    return bool(what)


def has_work(q: Tensor, layout: Union[BlockSparseLayout, AttentionPlan]) -> bool:
    """False when the call computes nothing (no query element, or no selected key token): out is 0, lse -inf."""
    return q.numel() > 0 and (isinstance(layout, AttentionPlan) or layout.computed_pairs > 0)


def select_backend(requested: str, q: Tensor, k: Tensor, v: Tensor, layout: Union[BlockSparseLayout, AttentionPlan],
                   scale: float, return_lse: bool, precision: str = "exact") -> Backend:
    """Resolve ``requested`` ("auto" or a backend name) to a backend that can run these inputs.

    ``layout``: a `BlockSparseLayout`, or a permuted `AttentionPlan` (eligibility is then decided from the
    tensors alone, see `Backend.unsupported_permuted_reason`). With ``"auto"`` the environment variable
    ``LVSA_KERNELS_BACKEND``, when set, names the backend instead. An explicit backend that cannot run raises
    `BackendUnavailable` naming what is missing; ``auto`` measures as described in the module docstring and
    raises only when no backend at all can run.
    """
    if not isinstance(requested, str):
        raise TypeError(f"backend: expected a str, got {type(requested).__name__}")
    if requested != "auto":
        return _explicit(requested, "backend argument", q, k, v, layout, return_lse, precision)
    env = os.environ.get(ENV_BACKEND, "")
    if env and env != "auto":
        return _explicit(env, f"environment variable {ENV_BACKEND}", q, k, v, layout, return_lse, precision)

    backends = registered_backends()
    if not has_work(q, layout) and _FALLBACK in backends and precision == "exact":
        return backends[_FALLBACK]  # nothing to run or time (`block_sparse_attn` returns zeros)
    if isinstance(layout, BlockSparseLayout) and layout.is_dense and _DENSE in backends:
        dense = backends[_DENSE]
        if _reason(dense, q, k, v, layout, return_lse, precision) is None:
            return dense
    eligible: Dict[str, Backend] = {}
    for name in candidate_order(q.device.type):
        reason = _reason(backends[name], q, k, v, layout, return_lse, precision)
        if reason is None:
            eligible[name] = backends[name]
        else:
            _warn_skip(name, reason)
    if not eligible and precision != "exact":
        raise BackendUnavailable(f"no backend can run precision={precision!r} on these inputs on device "
                                 f"{q.device.type!r} (see the warnings above for each backend's reason)")
    if not eligible:
        fallback = backends.get(_FALLBACK)
        reason = _reason(fallback, q, k, v, layout, return_lse) if fallback else "not registered"
        if reason:
            raise BackendUnavailable(f"no backend can run these inputs on device {q.device.type!r} "
                                     f"(reference: {reason})")
        _warn_once("using the slow 'reference' backend: no other backend is eligible (see the warnings above)")
        return fallback

    ready = {n: b for n, b in eligible.items() if not _needs_build(n, b, q, layout)}
    eligible = ready or eligible  # only candidates that would build: no timing among them decides anything new

    def runner(backend: Backend) -> Callable[[], object]:
        return lambda: run_on(backend, q, k, v, layout, scale, return_lse, precision)

    key = problem_key(q, k, layout, return_lse) + "|candidates=" + ",".join(eligible)
    if precision != "exact":
        key += f"|precision={precision}"
    return eligible[timed_choice(key, {n: runner(b) for n, b in eligible.items()}, q.device)]
