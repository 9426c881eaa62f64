"""SVOO offline sparsity profiles (spec: svoo-pattern.md §1): the CSV table and the profiler math.

A profile holds, per (denoising step, layer, head), the **keep ratio**: the mean over sampled queries of
the smallest fraction of keys that holds ``tau`` (default 0.95) of the query's softmax mass. CSV format
(the published one): header ``Step,Layer,Head,Sparsity``, ``Step`` 1-based, ``Layer``/``Head`` 0-based,
``Sparsity`` = keep ratio in [0, 1] with 4 decimals, one row per grid point.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch
from torch import Tensor

__all__ = ["ProfileError", "SVOOProfile", "keep_ratio_for_mass", "sample_query_rows"]

HEADER = ("Step", "Layer", "Head", "Sparsity")
_CHUNK_ELEMENTS = 1 << 24  # score elements per query chunk of the profiler


class ProfileError(ValueError):
    """A profile CSV or table is malformed or incomplete; the message names the file, line or grid point."""


@dataclass(frozen=True, eq=False)
class SVOOProfile:
    """Keep ratios ``keep`` float32 ``[steps, layers, heads]``; index ``step - 1`` holds CSV ``Step = step``."""

    keep: Tensor

    def __post_init__(self) -> None:
        keep = torch.as_tensor(self.keep, dtype=torch.float32).cpu()
        if keep.dim() != 3 or min(keep.shape) < 1:
            raise ProfileError(f"keep: expected a non-empty [steps, layers, heads] table, got shape {tuple(keep.shape)}")
        if not torch.isfinite(keep).all() or (keep < 0).any() or (keep > 1).any():
            raise ProfileError("keep: keep ratios must be finite and in [0, 1]")
        object.__setattr__(self, "keep", keep)

    @property
    def steps(self) -> int:
        return self.keep.shape[0]

    @property
    def layers(self) -> int:
        return self.keep.shape[1]

    @property
    def heads(self) -> int:
        return self.keep.shape[2]

    def keep_ratios(self, step: int, layer: int) -> Tensor:
        """float32 ``[heads]`` at 1-based ``step`` and 0-based ``layer``; raises ProfileError when missing."""
        if not (1 <= step <= self.steps and 0 <= layer < self.layers):
            raise ProfileError(f"profile has no entry for step {step} (1-based), layer {layer}; it covers steps "
                               f"1..{self.steps} and layers 0..{self.layers - 1}")
        return self.keep[step - 1, layer]

    def merge_max(self, other: "SVOOProfile") -> "SVOOProfile":
        """Element-wise maximum (how several calibration prompts are merged)."""
        if other.keep.shape != self.keep.shape:
            raise ProfileError(f"merge_max: grids differ, {tuple(self.keep.shape)} vs {tuple(other.keep.shape)}")
        return SVOOProfile(torch.maximum(self.keep, other.keep))

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the CSV (rows sorted by step, layer, head; 4 decimals)."""
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(HEADER)
            for (s, l, h), v in zip(torch.cartesian_prod(*(torch.arange(n) for n in self.keep.shape)).tolist(),
                                    self.keep.reshape(-1).tolist()):
                w.writerow((s + 1, l, h, f"{v:.4f}"))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "SVOOProfile":
        """Read and validate a CSV: exact header, integer indices, values in [0, 1], no duplicates, complete grid."""
        try:
            entries = _read_rows(path)
        except UnicodeDecodeError as exc:
            raise ProfileError(f"{path}: not UTF-8 text ({exc})") from None
        except csv.Error as exc:
            raise ProfileError(f"{path}: not a CSV table ({exc})") from None
        if not entries:
            raise ProfileError(f"{path}: no rows")
        n_s, n_l, n_h = (max(key[i] for key in entries) + (0 if i == 0 else 1) for i in range(3))
        if len(entries) != n_s * n_l * n_h:  # checked before allocating: an absurd index cannot allocate
            s, l, h = _first_missing(entries, n_l, n_h)
            raise ProfileError(f"{path}: incomplete grid ({len(entries)} of {n_s}x{n_l}x{n_h} rows); "
                               f"first missing: step {s}, layer {l}, head {h}")
        keep = torch.empty(n_s, n_l, n_h)
        for (s, l, h), v in entries.items():
            keep[s - 1, l, h] = v
        return cls(keep)


def _read_rows(path: Union[str, os.PathLike]) -> Dict[tuple, float]:
    """``{(step, layer, head): keep ratio}`` of a profile CSV, each row checked (header, fields, ranges, duplicates)."""
    entries: Dict[tuple, float] = {}
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header is None or tuple(c.strip() for c in header) != HEADER:
            raise ProfileError(f"{path}: expected header {','.join(HEADER)}, got {header!r}")
        for line, row in enumerate(rows, start=2):
            if not row:
                continue
            if len(row) != 4:
                raise ProfileError(f"{path}:{line}: expected 4 fields, got {len(row)}")
            try:
                s, l, h, v = int(row[0]), int(row[1]), int(row[2]), float(row[3])
            except ValueError:
                raise ProfileError(f"{path}:{line}: cannot parse {row!r}") from None
            if s < 1 or l < 0 or h < 0:
                raise ProfileError(f"{path}:{line}: Step must be >= 1, Layer and Head >= 0, got {row!r}")
            if not (0 <= v <= 1):
                raise ProfileError(f"{path}:{line}: Sparsity (keep ratio) must be in [0, 1], got {v}")
            if (s, l, h) in entries:
                raise ProfileError(f"{path}:{line}: duplicate row for step {s}, layer {l}, head {h}")
            entries[(s, l, h)] = v
    return entries


def _first_missing(entries: Dict[tuple, float], n_l: int, n_h: int) -> tuple:
    """The first (step, layer, head) in grid order that ``entries`` lacks (O(rows), nothing allocated per grid point)."""
    for i, (s, l, h) in enumerate(sorted(entries)):
        expected = (i // (n_l * n_h) + 1, i // n_h % n_l, i % n_h)
        if (s, l, h) != expected:
            return expected
    i = len(entries)
    return i // (n_l * n_h) + 1, i // n_h % n_l, i % n_h


# ---------------------------------------------------------------------------------------------- profiler math
def sample_query_rows(n: int, num: Optional[int]) -> Tensor:
    """int64 query rows: all when ``num`` is None or >= n, the middle row ``n // 2`` for 1 (as the published
    profiler), else ``round(linspace(0, n-1, num))``."""
    if num is None or num >= n:
        return torch.arange(n)
    if num < 1:
        raise ValueError(f"num_queries: expected None or an int >= 1, got {num!r}")
    if num == 1:
        return torch.tensor([n // 2])
    return torch.unique(torch.linspace(0, n - 1, num).round().to(torch.int64))


def keep_ratio_for_mass(q: Tensor, k: Tensor, tau: float = 0.95, num_queries: Optional[int] = None,
                        scale: Optional[float] = None) -> Tensor:
    """Per-head keep ratio: mean over batch and sampled queries of ``c_i / Skv``.

    ``c_i`` is the smallest number of keys whose softmax mass reaches ``tau`` of the row total (descending
    sort, cumulative sum, left insertion index + 1), computed in float32 in query chunks (never Sq x Skv).

    Args:
        q: ``[B, Sq, H, D]``; k: ``[B, Skv, H_kv, D]`` (GQA: head h reads kv head ``h // (H // H_kv)``).
        tau: target mass in (0, 1]. num_queries: see `sample_query_rows`. scale: default 1/sqrt(D).
    Returns:
        float32 ``[H]``.
    """
    if not 0 < tau <= 1:
        raise ValueError(f"tau: expected 0 < tau <= 1, got {tau}")
    B, Sq, H, D = q.shape
    Skv, Hkv = k.shape[1], k.shape[2]
    if H % Hkv:
        raise ValueError(f"k: H_kv={Hkv} must divide H={H}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    kt = k.repeat_interleave(H // Hkv, dim=2).float().permute(0, 2, 3, 1)  # [B, H, D, Skv]
    rows = sample_query_rows(Sq, num_queries).to(q.device)
    chunk = max(1, _CHUNK_ELEMENTS // (B * H * Skv))
    total = torch.zeros(H, dtype=torch.float64, device=q.device)
    for r0 in range(0, rows.numel(), chunk):
        qq = q[:, rows[r0:r0 + chunk]].float().transpose(1, 2)  # [B, H, m, D]
        p = torch.softmax((qq @ kt) * scale, dim=-1)
        cum = torch.cumsum(torch.sort(p, dim=-1, descending=True).values, dim=-1)
        need = torch.searchsorted(cum, tau * cum[..., -1:].contiguous()).squeeze(-1) + 1
        total += need.clamp(max=Skv).double().sum(dim=(0, 2))
    return (total / (B * rows.numel() * Skv)).float().cpu()
