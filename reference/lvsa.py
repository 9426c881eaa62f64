"""LVSA frame pattern (local window + first frames + rotating periodic keyframes) and its planner.

All knobs are in **latent frames** (one latent frame = ``tokens_per_frame`` tokens; ``video frames
F -> latent T = (F - 1) // 4 + 1``, see `latent_frames`). The formulas follow the published LVSA
method exactly (anchor set, adaptive/expanded window, auto keyframe interval); the deviations of the
published code (per-layer rebuilds, off-by-one rotation, silent fallbacks) are not reproduced.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from .layout import BlockSparseLayout, TextBlock

__all__ = ["LVSAPattern", "auto_key_frame_interval", "global_anchor_frames", "latent_frames"]


def latent_frames(video_frames: int, temporal_factor: int = 4) -> int:
    """Latent frames ``T = (F - 1) // temporal_factor + 1`` for ``F`` video frames."""
    if video_frames < 1:
        raise ValueError(f"video_frames must be >= 1, got {video_frames}")
    return (video_frames - 1) // temporal_factor + 1


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def auto_key_frame_interval(frames: int, window: int, n_first: int, reference_frames: int,
                            sparsity_scale: float = 1.0) -> int:
    """Auto keyframe interval (kfi) keeping the per-query frame budget near the training horizon.

    Returns 1 (dense) when ``frames <= max(n_first + 1, int(reference_frames * sparsity_scale))``.
    """
    T, W, nf = frames, window, n_first
    R = max(nf + 1, int(reference_frames * sparsity_scale))
    if T <= R:
        return 1
    nfe = min(nf, T)
    target = max(nf, min(R, T) - min(2 * W + 1, T))
    strict = 1
    for k in range(T, 0, -1):  # |S(k)| grows as k shrinks: first k that reaches the target wins
        if nfe + _ceil_div(T, k) - _ceil_div(nfe, k) >= target:
            strict = k
            break
    m = 2 * W + nf
    fallback = _ceil_div(max(T - m, R - m), max(R - m, 1))
    return max(strict, fallback)


def global_anchor_frames(frames: int, n_first: int, kfi: int, offset: int,
                         anchors: str = "published") -> Tuple[int, ...]:
    """Sorted global anchor frames G (first ``n_first`` frames + periodic keyframes shifted by ``offset``).

    ``anchors="published"`` is the published rule (periodic set wraps modulo T and may collide with
    the first frames, so |G| varies with the offset); ``"constant"`` draws the periodic anchors from
    the non-first frames only, so |G| is the same for every offset.
    """
    T = frames
    nfe = min(n_first, T)
    g = set(range(nfe))
    if kfi and kfi >= 1:
        if anchors == "published":
            g.update((offset + i * kfi) % T for i in range(_ceil_div(T, kfi)))
        elif anchors == "constant":
            pool = T - nfe
            if pool > 0:
                g.update(nfe + (offset + i * kfi) % pool for i in range(_ceil_div(pool, kfi)))
        else:
            raise ValueError(f"anchors must be 'published' or 'constant', got {anchors!r}")
    return tuple(sorted(g))


def _window_bounds(f: int, T: int, W: int, g: frozenset, expand: bool) -> Tuple[int, int]:
    """Inclusive local-window bounds [lo, hi] of query frame f (empty when W == 0: hi < lo)."""
    if W == 0:
        return f, f - 1
    lo = max(0, min(f - W, T - 1 - 2 * W))
    hi = min(T - 1, max(f + W, 2 * W))
    if not expand:
        return lo, hi
    target = min(2 * W + 1, T - len(g))
    c = sum(1 for x in range(lo, hi + 1) if x not in g)
    while c < target:
        moved = False
        if lo > 0:
            lo -= 1
            c += lo not in g
            moved = True
        if c >= target:
            break
        if hi < T - 1:
            hi += 1
            c += hi not in g
            moved = True
        if not moved:
            break
    return lo, hi


@functools.lru_cache(maxsize=512)
def _frame_mask_cached(T: int, W: int, g: Tuple[int, ...], expand: bool) -> torch.Tensor:
    gs = frozenset(g)
    bounds = torch.tensor([_window_bounds(f, T, W, gs, expand) for f in range(T)]).view(T, 2)
    cols = torch.arange(T)
    mask = (cols >= bounds[:, :1]) & (cols <= bounds[:, 1:])
    if g:
        mask[:, list(g)] = True
    return mask


@dataclass(frozen=True)
class LVSAPattern:
    """LVSA sparsity pattern, in latent-frame units.

    Args:
        window: local half-window W (attends up to 2W+1 neighbouring frames).
        n_first: leading frames that every query attends (never rotated).
        reference_frames: the model's training horizon in latent frames (Wan 21, HunyuanVideo 1.5 33,
            CogVideoX 13); at or below ``reference_frames * sparsity_scale`` the pattern is dense.
        sparsity_scale: scales the reference horizon (< 1 gives sparsity at the training length).
        key_frame_interval: periodic keyframe spacing; None = auto (`auto_key_frame_interval`),
            0 = no periodic keyframes.
        expand_window: widen the window so that it always holds min(2W+1, T-|G|) non-global frames.
        rotate: shift the periodic keyframes by one frame per denoising step (offset = step mod kfi).
        anchors: "published" (reference parity) or "constant" (same |G| at every offset).
    """

    window: int = 3
    n_first: int = 1
    reference_frames: int = 21
    sparsity_scale: float = 1.0
    key_frame_interval: Optional[int] = None
    expand_window: bool = True
    rotate: bool = True
    anchors: str = "published"

    def __post_init__(self) -> None:
        for name in ("window", "n_first", "reference_frames"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if self.reference_frames < 1:
            raise ValueError(f"reference_frames must be >= 1, got {self.reference_frames}")
        if not self.sparsity_scale > 0:
            raise ValueError(f"sparsity_scale must be > 0, got {self.sparsity_scale}")
        if self.key_frame_interval is not None and (
            not isinstance(self.key_frame_interval, int) or self.key_frame_interval < 0
        ):
            raise ValueError(f"key_frame_interval must be None or an int >= 0, got {self.key_frame_interval!r}")
        if self.anchors not in ("published", "constant"):
            raise ValueError(f"anchors must be 'published' or 'constant', got {self.anchors!r}")

    # ------------------------------------------------------------------ frame level
    def key_frame_interval_for(self, frames: int) -> int:
        """The keyframe interval used at ``frames`` latent frames (auto when not set)."""
        _check_frames(frames)
        if self.key_frame_interval is not None:
            return self.key_frame_interval
        return auto_key_frame_interval(frames, self.window, self.n_first, self.reference_frames,
                                       self.sparsity_scale)

    def rotation_offset(self, frames: int, step: int) -> int:
        """Keyframe offset at denoising step ``step`` (0-based): ``step mod kfi`` when rotating."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        kfi = self.key_frame_interval_for(frames)
        return step % kfi if (self.rotate and kfi >= 1) else 0

    def global_frames(self, frames: int, step: int = 0) -> Tuple[int, ...]:
        """Sorted global anchor frames at ``step``."""
        kfi = self.key_frame_interval_for(frames)
        return global_anchor_frames(frames, self.n_first, kfi, self.rotation_offset(frames, step), self.anchors)

    def window_bounds(self, frames: int, step: int = 0) -> List[Tuple[int, int]]:
        """Inclusive local-window bounds ``(lo, hi)`` per query frame (``hi < lo`` when W = 0)."""
        g = frozenset(self.global_frames(frames, step))
        return [_window_bounds(f, frames, self.window, g, self.expand_window) for f in range(frames)]

    def frame_mask(self, frames: int, step: int = 0) -> torch.Tensor:
        """bool ``[frames, frames]``: row = query frame, column = key frame. Cached; do not modify."""
        g = self.global_frames(frames, step)
        return _frame_mask_cached(frames, self.window, g, self.expand_window)

    # ------------------------------------------------------------------ token level
    def plan(self, frames: int, tokens_per_frame: int, step: int = 0, text_tokens: int = 0,
             text_position: str = "after") -> BlockSparseLayout:
        """Block-sparse layout over ``frames * tokens_per_frame`` video tokens (+ ``text_tokens``).

        One block per latent frame, plus one text block placed ``"after"`` or ``"before"`` the video.
        Video queries attend their LVSA frames and every text token; text queries attend everything.
        Layouts are cached per (pattern, geometry, rotation offset), so planning every layer is free.
        """
        _check_frames(frames)
        if tokens_per_frame < 1:
            raise ValueError(f"tokens_per_frame must be >= 1, got {tokens_per_frame}")
        if text_tokens < 0:
            raise ValueError(f"text_tokens must be >= 0, got {text_tokens}")
        if text_position not in ("after", "before"):
            raise ValueError(f"text_position must be 'after' or 'before', got {text_position!r}")
        return _plan_cached(self, frames, tokens_per_frame, self.rotation_offset(frames, step),
                            text_tokens, text_position)

    def describe(self, frames: int, step: int = 0) -> str:
        """One-line summary at ``frames`` latent frames: kfi, offset, |G|, |A| range, frame density."""
        m = self.frame_mask(frames, step)
        per_row = m.sum(1)
        return (f"LVSA T={frames} W={self.window} n_first={self.n_first} ref={self.reference_frames} "
                f"scale={self.sparsity_scale} kfi={self.key_frame_interval_for(frames)} "
                f"offset={self.rotation_offset(frames, step)} |G|={len(self.global_frames(frames, step))} "
                f"|A|={int(per_row.min())}..{int(per_row.max())} frame density={m.float().mean().item():.4f}")


@functools.lru_cache(maxsize=256)
def _plan_cached(pattern: LVSAPattern, T: int, P: int, offset: int, L: int, pos: str) -> BlockSparseLayout:
    kfi = pattern.key_frame_interval_for(T)
    g = global_anchor_frames(T, pattern.n_first, kfi, offset, pattern.anchors)
    fm = _frame_mask_cached(T, pattern.window, g, pattern.expand_window)
    meta = {"pattern": "lvsa", "frames": T, "tokens_per_frame": P, "kfi": kfi, "offset": offset,
            "global_frames": g, "window": pattern.window, "n_first": pattern.n_first,
            "reference_frames": pattern.reference_frames, "text_tokens": L}
    if L == 0:
        meta["global_kv_blocks"] = g
        return BlockSparseLayout.from_block_mask(fm, [P] * T, [P] * T, meta)
    n = T + 1
    mask = torch.ones(n, n, dtype=torch.bool)
    v = slice(0, T) if pos == "after" else slice(1, n)
    t = T if pos == "after" else 0
    mask[v, v] = fm
    sizes = [P] * T + [L] if pos == "after" else [L] + [P] * T
    meta["global_kv_blocks"] = tuple(x + 1 for x in g) if pos == "before" else g  # the text block comes first
    meta.update(text_position=pos)
    return BlockSparseLayout.from_block_mask(mask, sizes, sizes, meta, TextBlock(t, t))


def _check_frames(frames: int) -> None:
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames (latent frames) must be an int >= 1, got {frames!r}")

