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

Overrides: the ``backend=`` argument, or the environment variable ``LVSA_KERNELS_BACKEND`` (read when
the argument is ``"auto"``). An explicit backend that cannot run raises `BackendUnavailable`.
The cache folder is ``~/.cache/lvsa_kernels`` unless ``LVSA_KERNELS_CACHE_DIR`` names another one
(`lvsa_kernels.settings`: invalid entries are ignored with one WARNING, writes are merged under a lock).

`timed_choice` is the measurement hook shared with backends that pick among their own variants (the
NPU backend chooses between two torch_npu ops with it).
"""
from __future__ import annotations

import logging
import math
import os
import platform
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Set

import torch
from torch import Tensor

from .backends import BackendUnavailable, get_backend, registered_backends
from .backends.base import Backend
from .reference import BlockSparseLayout
from .settings import ENV_CACHE_DIR, cache_dir, read_entries, update_entries
from .timing import median_seconds

__all__ = [
    "ENV_BACKEND", "ENV_CACHE_DIR", "PREFERENCE", "select_backend", "candidate_order", "problem_key",
    "timed_choice", "measure", "cache_file", "cached_choices", "reset_state", "has_work",
]

log = logging.getLogger("lvsa_kernels")
ENV_BACKEND = "LVSA_KERNELS_BACKEND"
CACHE_FILE_NAME = "backends.json"

# Static preference among sparse backends (used untimed, e.g. while torch.compile traces).
PREFERENCE = ("triton", "flashinfer", "npu")
_DENSE = "sdpa"
_FALLBACK = "reference"
_WARMUP, _REPEATS = 1, 3

_warned: Set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("lvsa_kernels auto: %s", message)


def _warn_skip(name: str, reason: str) -> None:
    _warn_once(f"skipping backend {name!r}: {reason}")


# ---------------------------------------------------------------------------------------- cache
def cache_file() -> Path:
    """The JSON file of measured winners: ``backends.json`` in `settings.cache_dir`."""
    return cache_dir() / CACHE_FILE_NAME


def _valid_entry(key: str, entry: Any) -> Optional[Dict[str, Any]]:
    """A cache entry ``{"winner": name, "times_ms": {name: ms}}`` if it has that shape, else None."""
    if not isinstance(entry, dict) or not isinstance(entry.get("winner"), str):
        return None
    times = entry.get("times_ms", {})
    if not isinstance(times, dict) or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) for t in times.values()):
        return None
    return {"winner": entry["winner"], "times_ms": dict(times)}


class _ChoiceCache:
    """Winners by key: the file's entries, loaded once, plus what this process measured."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: Dict[str, Dict[str, Any]] = read_entries(path, _valid_entry)

    def get(self, key: str) -> Optional[str]:
        entry = self.entries.get(key)
        return entry["winner"] if entry else None

    def put(self, key: str, winner: str, times_ms: Mapping[str, float]) -> None:
        entry = {"winner": winner, "times_ms": {n: round(t, 4) for n, t in times_ms.items()}}
        self.entries[key] = entry
        try:
            update_entries(self.path, {key: entry}, _valid_entry)  # merged with other processes' entries
        except OSError as exc:
            _warn_once(f"cannot write {self.path} ({exc}); choices stay in memory only")


_state: Optional[_ChoiceCache] = None


def _cache() -> _ChoiceCache:
    global _state
    path = cache_file()
    if _state is None or _state.path != path:
        _state = _ChoiceCache(path)
    return _state


def reset_state() -> None:
    """Forget the in-memory choices (the next lookup reads the cache file again)."""
    global _state
    _state = None


def cached_choices() -> Dict[str, Dict[str, Any]]:
    """All cached winners ``{key: {"winner": name, "times_ms": {...}}}`` (file + this process)."""
    return dict(_cache().entries)


# ---------------------------------------------------------------------------------------- timing
def measure(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of ``fn()`` on ``device`` after a warm-up (CUDA events on CUDA, else perf_counter)."""
    return median_seconds(fn, device, _REPEATS, _WARMUP) * 1e3


def timed_choice(key: str, candidates: Mapping[str, Callable[[], object]], device: torch.device) -> str:
    """Name of the fastest candidate for ``key``: cached, else measured once with `measure` and cached.

    ``candidates`` maps names to zero-argument callables, in preference order. A cached winner that is
    no longer a candidate is measured again. While ``torch.compile`` traces, nothing is timed: the
    cached winner or else the first candidate is returned. A candidate that raises while being timed is
    skipped with a WARNING; if all raise, the first candidate's error propagates.
    """
    if not candidates:
        raise ValueError("timed_choice: no candidates")
    names = list(candidates)
    cache = _cache()
    cached = cache.get(key)
    if cached in candidates:
        return cached
    if len(names) == 1 or torch.compiler.is_compiling():
        return names[0]
    times: Dict[str, float] = {}
    errors: Dict[str, Exception] = {}
    for name in names:
        try:
            times[name] = measure(candidates[name], device)
        except Exception as exc:  # a candidate that fails here must not break auto; it is reported
            errors[name] = exc
            _warn_skip(name, f"failed while being timed for {key}: {exc!r}")
    if not times:
        raise errors[names[0]]
    winner = min(times, key=times.__getitem__)
    cache.put(key, winner, times)
    log.info("lvsa_kernels auto: %s -> %s (%s)", key, winner,
             ", ".join(f"{n} {t:.3f} ms" for n, t in times.items()))
    return winner


# ---------------------------------------------------------------------------------------- keys
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    module = getattr(torch, device.type, None)
    get_name = getattr(module, "get_device_name", None)
    if device.type != "cpu" and callable(get_name):
        return str(get_name())
    return platform.processor() or platform.machine() or device.type


def problem_key(q: Tensor, k: Tensor, layout: BlockSparseLayout, return_lse: bool) -> str:
    """Problem class of a call: device type and name, dtype, head dim, GQA ratio, log2(Sq) rounded,
    density in 0.1 steps, shared or per-head layout, and whether lse is returned."""
    gqa = q.shape[2] // k.shape[2]
    sq = max(q.shape[1], 1)
    heads = "shared" if layout.num_heads == 1 else "per-head"
    return (f"{q.device.type}:{_device_name(q.device)}|{str(q.dtype).replace('torch.', '')}|d{q.shape[-1]}"
            f"|gqa{gqa}|sq2^{round(math.log2(sq))}|density{round(layout.density, 1):.1f}|{heads}"
            f"|lse{int(return_lse)}")


# ---------------------------------------------------------------------------------------- selection
def candidate_order(device_type: str) -> List[str]:
    """Sparse backends that run on ``device_type`` tensors, in preference order (then registration order).

    ``sdpa`` (dense layouts only) and ``reference`` (last resort) are handled separately by `select_backend`.
    """
    backends = registered_backends()
    names = [n for n in PREFERENCE if n in backends]
    names += [n for n in backends if n not in names and n not in (_DENSE, _FALLBACK)]
    return [n for n in names if device_type in backends[n].caps.devices]


def _explicit(name: str, source: str, q: Tensor, k: Tensor, layout: BlockSparseLayout, return_lse: bool) -> Backend:
    try:
        backend = get_backend(name)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    reason = backend.unsupported_reason(q, k, layout, return_lse)
    if reason:
        raise BackendUnavailable(f"backend {name!r} ({source}) cannot run these inputs: {reason}")
    return backend


def _needs_build(name: str, backend: Backend, q: Tensor, layout: BlockSparseLayout) -> bool:
    """Whether ``backend`` would compile something first; such a candidate is not timed (logged once)."""
    what = backend.build_needed(q, layout)
    if what:
        _warn_once(f"not timing backend {name!r}: its first run would JIT-build {what}; run it once explicitly "
                   f"(backend={name!r}) to build, after which auto measures it")
    return bool(what)


def has_work(q: Tensor, layout: BlockSparseLayout) -> bool:
    """False when the call computes nothing (no query element, or no selected key token): out is 0, lse -inf."""
    return q.numel() > 0 and layout.computed_pairs > 0


def select_backend(requested: str, q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout,
                   scale: float, return_lse: bool) -> Backend:
    """Resolve ``requested`` ("auto" or a backend name) to a backend that can run these inputs.

    With ``"auto"`` the environment variable ``LVSA_KERNELS_BACKEND``, when set, names the backend
    instead. An explicit backend that cannot run raises `BackendUnavailable` naming what is missing;
    ``auto`` measures as described in the module docstring and raises only when no backend at all can run.
    """
    if not isinstance(requested, str):
        raise TypeError(f"backend: expected a str, got {type(requested).__name__}")
    if requested != "auto":
        return _explicit(requested, "backend argument", q, k, layout, return_lse)
    env = os.environ.get(ENV_BACKEND, "")
    if env and env != "auto":
        return _explicit(env, f"environment variable {ENV_BACKEND}", q, k, layout, return_lse)

    backends = registered_backends()
    if not has_work(q, layout) and _FALLBACK in backends:
        return backends[_FALLBACK]  # nothing to run or time (`block_sparse_attn` returns zeros)
    if layout.is_dense and _DENSE in backends:
        dense = backends[_DENSE]
        if dense.unsupported_reason(q, k, layout, return_lse) is None:
            return dense
    eligible: Dict[str, Backend] = {}
    for name in candidate_order(q.device.type):
        reason = backends[name].unsupported_reason(q, k, layout, return_lse)
        if reason is None:
            eligible[name] = backends[name]
        else:
            _warn_skip(name, reason)
    if not eligible:
        fallback = backends.get(_FALLBACK)
        reason = fallback.unsupported_reason(q, k, layout, return_lse) if fallback else "not registered"
        if reason:
            raise BackendUnavailable(f"no backend can run these inputs on device {q.device.type!r} "
                                     f"(reference: {reason})")
        _warn_once("using the slow 'reference' backend: no other backend is eligible (see the warnings above)")
        return fallback

    ready = {n: b for n, b in eligible.items() if not _needs_build(n, b, q, layout)}
    eligible = ready or eligible  # only candidates that would build: no timing among them decides anything new

    def runner(backend: Backend) -> Callable[[], object]:
        return lambda: backend.run(q, k, v, layout, scale, return_lse)

    key = problem_key(q, k, layout, return_lse) + "|candidates=" + ",".join(eligible)
    return eligible[timed_choice(key, {n: runner(b) for n, b in eligible.items()}, q.device)]
