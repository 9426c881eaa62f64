"""Measured choice among named candidates, and the on-disk cache of the winners.

`timed_choice` times zero-argument candidates once per key (`measure`: warm-up, then the median of a few
runs with `lvsa_kernels.timing`), caches the winner in memory and in a JSON file (`cache_file`), and reads
the cached winner afterwards. `problem_key` names the problem class of an attention call. Used by the
dispatcher (`lvsa_kernels.dispatch`, choosing a backend) and by backends choosing among their own variants
(the NPU backend's two torch_npu ops); it imports neither.
The cache folder is ``~/.cache/lvsa_kernels`` unless ``LVSA_KERNELS_CACHE_DIR`` names another one
(`lvsa_kernels.settings`: invalid entries are ignored with one WARNING, writes are merged under a lock).
"""
from __future__ import annotations

import logging
import math
import platform
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Set, Union

import torch
from torch import Tensor

from .reference.layout import BlockSparseLayout
from .reference.plan import AttentionPlan
from .settings import ENV_CACHE_DIR, cache_dir, read_entries, update_entries
from .timing import median_seconds

__all__ = ["ENV_CACHE_DIR", "cache_file", "cached_choices", "measure", "problem_key", "reset_state", "timed_choice"]

log = logging.getLogger("lvsa_kernels")

CACHE_FILE_NAME = "backends.json"

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


def problem_key(q: Tensor, k: Tensor, layout: Union[BlockSparseLayout, AttentionPlan], return_lse: bool) -> str:
    """Problem class of a call: device type and name, dtype, head dim, GQA ratio, log2(Sq) rounded,
    density in 0.1 steps, shared or per-head layout, and whether lse is returned. A permuted `AttentionPlan`
    counts as "permuted" instead of a density (reading its device-side blocks would wait for the device)."""
    gqa = q.shape[2] // k.shape[2]
    sq = max(q.shape[1], 1)
    if isinstance(layout, BlockSparseLayout):
        blocks = f"density{round(layout.density, 1):.1f}|{'shared' if layout.num_heads == 1 else 'per-head'}"
    else:
        blocks = "permuted|per-head"
    return (f"{q.device.type}:{_device_name(q.device)}|{str(q.dtype).replace('torch.', '')}|d{q.shape[-1]}"
            f"|gqa{gqa}|sq2^{round(math.log2(sq))}|{blocks}|lse{int(return_lse)}")
