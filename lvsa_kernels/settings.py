"""The on-disk cache folder and its JSON files, shared by the dispatcher and the Triton tuner.

A leaf module (standard library only), so `lvsa_kernels.triton_src.tuning` can use it without importing
the API or the dispatcher. Files are ``{"version": 1, "entries": {key: value}}``; each entry is checked
by the caller's ``check`` and a file's invalid entries are dropped with one WARNING. Updates read, merge
and atomically replace the file while holding an exclusive ``fcntl.flock`` on the cache folder (POSIX;
elsewhere unlocked), so concurrent processes never drop each other's entries.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional

try:
    import fcntl
except ImportError:  # not POSIX: updates are atomic but not merged under a lock
    fcntl = None

__all__ = ["ENV_CACHE_DIR", "cache_dir", "read_entries", "update_entries"]

log = logging.getLogger("lvsa_kernels")
ENV_CACHE_DIR = "LVSA_KERNELS_CACHE_DIR"
_VERSION = 1
Check = Callable[[str, Any], Optional[Any]]  # (key, raw JSON value) -> value to keep, or None if invalid


def cache_dir() -> Path:
    """``$LVSA_KERNELS_CACHE_DIR``, else ``~/.cache/lvsa_kernels``."""
    return Path(os.environ.get(ENV_CACHE_DIR) or os.path.join(os.path.expanduser("~"), ".cache", "lvsa_kernels"))


def _parse(path: Path, check: Check, raw_values: bool = False) -> tuple:
    """``(valid entries, problem or None)`` of the file at ``path`` (missing file: no entries, no problem).
    Entries map to ``check``'s result, or to their JSON value with ``raw_values``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, None
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON
        return {}, f"cannot read the file ({exc})"
    if not isinstance(data, dict) or data.get("version") != _VERSION or not isinstance(data.get("entries"), dict):
        return {}, "unknown format"
    entries, bad = {}, []
    for key, raw in data["entries"].items():
        value = check(key, raw)
        if value is None:
            bad.append(key)
        else:
            entries[key] = raw if raw_values else value
    return entries, (f"{len(bad)} invalid entries (first: {bad[0]!r})" if bad else None)


def read_entries(path: Path, check: Check) -> Dict[str, Any]:
    """The valid entries of the cache file ``path``; a problem is logged once at WARNING (they are re-measured)."""
    entries, problem = _parse(path, check)
    if problem:
        log.warning("lvsa_kernels: cache file %s: %s; ignored, measured again when needed",
                    path, problem)
    return entries


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Exclusive ``flock`` on the cache folder itself (no lock file left behind)."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def update_entries(path: Path, new: Mapping[str, Any], check: Check) -> Dict[str, Any]:
    """Merge ``new`` into the file's valid entries and atomically replace it, under the file lock.

    Returns the merged entries. Raises OSError when the folder cannot be written (callers keep their
    entries in memory and say so).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent):
        merged, _ = _parse(path, check, raw_values=True)  # invalid entries were reported when the file was read
        merged.update(new)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": _VERSION, "entries": merged}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    return merged
