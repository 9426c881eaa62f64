"""LVSA frame pattern (local window + first frames + rotating periodic keyframes) and its planner.

All knobs are in **latent frames** (one latent frame = ``tokens_per_frame`` tokens; ``video frames
F -> latent T = (F - 1) // 4 + 1``, see `latent_frames`). The formulas follow the published LVSA
method exactly (anchor set, adaptive/expanded window, auto keyframe interval); the deviations of the
published code (per-layer rebuilds, off-by-one rotation, silent fallbacks) are not reproduced.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import ClassVar, List, Optional, Tuple

import torch

from .args import ArgumentError, as_flag, as_int, as_real
from .layout import BlockSparseLayout, TextBlock, _as_offsets
from .plan import AttentionCall, AttentionPlan

__all__ = ["LVSAPattern", "auto_key_frame_interval", "global_anchor_frames", "latent_frames"]


def latent_frames(video_frames: int, temporal_factor: int = 4) -> int:
    """Latent frames ``T = (F - 1) // temporal_factor + 1`` for ``F`` video frames."""
    video_frames = as_int("video_frames", video_frames, 1)
    temporal_factor = as_int("temporal_factor", temporal_factor, 1)
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
    # |S(k)| = nfe + ceil(T / k) - ceil(nfe / k) grows (not monotonically) as k shrinks: the largest k that
    # reaches the target wins (vectorised over k = T .. 1)
    k = torch.arange(T, 0, -1, dtype=torch.int64)
    reached = torch.nonzero(nfe + (T + k - 1) // k - (nfe + k - 1) // k >= target)
    strict = int(k[reached[0, 0]]) if reached.numel() else 1
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


def _window_bounds(T: int, W: int, g: Tuple[int, ...], expand: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inclusive local-window bounds ``lo, hi`` (int64 ``[T]``) of every query frame; empty (hi < lo) when W == 0.

    With ``expand``, a window is widened one frame down, then one up, alternately, until it holds
    ``min(2W + 1, T - |G|)`` frames outside G. Vectorised over frames; the loop runs once per widening
    step of the widest row (at most |G| + 1 times), so time is O(T * (|G| + 1)).
    """
    f = torch.arange(T)
    if W == 0:
        return f, f - 1
    lo = torch.clamp(torch.clamp(f - W, max=T - 1 - 2 * W), min=0)
    hi = torch.clamp(torch.clamp(f + W, min=2 * W), max=T - 1)
    if not expand:
        return lo, hi
    is_g = torch.zeros(T + 1, dtype=torch.int64)  # one spare slot for index T
    is_g[torch.tensor(g, dtype=torch.int64)] = 1
    g_before = torch.zeros(T + 1, dtype=torch.int64)
    g_before[1:] = torch.cumsum(is_g[:T], 0)
    count = (hi - lo + 1) - (g_before[hi + 1] - g_before[lo])   # non-global frames inside the window
    target = min(2 * W + 1, T - len(g))
    rows = torch.nonzero(count < target).flatten()
    while rows.numel():
        down = lo[rows] > 0
        lo[rows] -= down.long()
        count[rows] += down.long() * (1 - is_g[lo[rows]])
        short = count[rows] < target                  # a row that reached the target stops before widening up
        rows, down = rows[short], down[short]
        up = hi[rows] < T - 1
        hi[rows] += up.long()
        count[rows] += up.long() * (1 - is_g[hi[rows]])
        rows = rows[(count[rows] < target) & (down | up)]  # a row that can move no further stops
    return lo, hi


def _frame_table(T: int, W: int, g: Tuple[int, ...], expand: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attended key frames of every query frame as a padded table: ``values`` int32 ``[T, K]`` and ``valid``
    bool ``[T, K]``; the valid entries of row f, left to right, are f's window ∪ G in increasing order.

    Columns: |G| slots for the anchors left of the window, the widest window, |G| slots for the anchors
    right of it, so K <= 2 |G| + max window width: O(T * per-frame budget) time and memory.
    """
    lo, hi = _window_bounds(T, W, g, expand)
    G = torch.tensor(g, dtype=torch.int64)
    width = (hi - lo + 1).clamp(min=0)
    below = torch.searchsorted(G, lo)                       # anchors left of the window: G[:below]
    first_above = torch.searchsorted(G, hi, right=True)     # anchors right of it: G[first_above:]
    j = torch.arange(len(g))
    span = torch.arange(int(width.max()))
    values = torch.cat([G.expand(T, -1), lo[:, None] + span, G.expand(T, -1)], 1).to(torch.int32)
    valid = torch.cat([j < below[:, None], span < width[:, None], j >= first_above[:, None]], 1)
    return values, valid


def _frame_rows(T: int, W: int, g: Tuple[int, ...], expand: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Frame-level CSR ``(ptr int64 [T + 1], cols int32 [nnz])``: query frame f attends the sorted key
    frames ``cols[ptr[f]:ptr[f + 1]]``."""
    values, valid = _frame_table(T, W, g, expand)
    return _csr(values, valid)


def _csr(values: torch.Tensor, valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    ptr = torch.zeros(values.shape[0] + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(valid.sum(1), 0)
    return ptr, values[valid]


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

    per_layer: ClassVar[bool] = False  # `VideoPattern`: one plan per step, shared by every layer

    def __post_init__(self) -> None:
        for name in ("window", "n_first", "reference_frames"):
            object.__setattr__(self, name, as_int(name, getattr(self, name), 1 if name == "reference_frames" else 0))
        scale = as_real("sparsity_scale", self.sparsity_scale)
        if not scale > 0:
            raise ArgumentError(f"sparsity_scale: expected a finite real > 0, got {scale}")
        object.__setattr__(self, "sparsity_scale", scale)
        if self.key_frame_interval is not None:
            object.__setattr__(self, "key_frame_interval", as_int("key_frame_interval", self.key_frame_interval, 0))
        for name in ("expand_window", "rotate"):
            object.__setattr__(self, name, as_flag(name, getattr(self, name)))
        if self.anchors not in ("published", "constant"):
            raise ArgumentError(f"anchors: expected 'published' or 'constant', got {self.anchors!r}")

    # ------------------------------------------------------------------ frame level
    def key_frame_interval_for(self, frames: int) -> int:
        """The keyframe interval used at ``frames`` latent frames (auto when not set)."""
        frames = _check_frames(frames)
        if self.key_frame_interval is not None:
            return self.key_frame_interval
        return auto_key_frame_interval(frames, self.window, self.n_first, self.reference_frames,
                                       self.sparsity_scale)

    def rotation_offset(self, frames: int, step: int) -> int:
        """Keyframe offset at denoising step ``step`` (0-based): ``step mod kfi`` when rotating."""
        step = as_int("step", step, 0)
        kfi = self.key_frame_interval_for(frames)
        return step % kfi if (self.rotate and kfi >= 1) else 0

    def global_frames(self, frames: int, step: int = 0) -> Tuple[int, ...]:
        """Sorted global anchor frames at ``step``."""
        kfi = self.key_frame_interval_for(frames)
        return global_anchor_frames(frames, self.n_first, kfi, self.rotation_offset(frames, step), self.anchors)

    def window_bounds(self, frames: int, step: int = 0) -> List[Tuple[int, int]]:
        """Inclusive local-window bounds ``(lo, hi)`` per query frame (``hi < lo`` when W = 0)."""
        lo, hi = _window_bounds(frames, self.window, self.global_frames(frames, step), self.expand_window)
        return list(zip(lo.tolist(), hi.tolist()))

    def frame_rows(self, frames: int, step: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        """Frame-level CSR ``(ptr int64 [frames + 1], cols int32 [nnz])`` of attended key frames per query
        frame (sorted). O(frames x per-frame budget)."""
        return _frame_rows(frames, self.window, self.global_frames(frames, step), self.expand_window)

    def frame_mask(self, frames: int, step: int = 0) -> torch.Tensor:
        """bool ``[frames, frames]``: row = query frame, column = key frame. O(frames^2): for inspection
        and tests; planning uses `frame_rows`."""
        ptr, cols = self.frame_rows(frames, step)
        mask = torch.zeros(frames, frames, dtype=torch.bool)
        mask[torch.repeat_interleave(torch.arange(frames), ptr[1:] - ptr[:-1]), cols.long()] = True
        return mask

    # ------------------------------------------------------------------ token level
    def plan(self, frames: int, tokens_per_frame: int, step: int = 0, text_tokens: int = 0,
             text_position: str = "after") -> BlockSparseLayout:
        """Block-sparse layout over ``frames * tokens_per_frame`` video tokens (+ ``text_tokens``).

        One block per latent frame, plus one text block placed ``"after"`` or ``"before"`` the video.
        Video queries attend their LVSA frames and every text token; text queries attend everything.
        Layouts are cached per (pattern, geometry, rotation offset), so planning every layer is free.
        """
        frames = _check_frames(frames)
        tokens_per_frame = as_int("tokens_per_frame", tokens_per_frame, 1)
        text_tokens = as_int("text_tokens", text_tokens, 0)
        if text_position not in ("after", "before"):
            raise ArgumentError(f"text_position: expected 'after' or 'before', got {text_position!r}")
        return _plan_cached(self, frames, tokens_per_frame, self.rotation_offset(frames, step),
                            text_tokens, text_position)

    def causal_plan(self, frames: int, tokens_per_frame: int, step: int = 0,
                    frames_per_block: int = 1) -> BlockSparseLayout:
        """The video layout intersected with the block-causal frame mask of diffusion forcing: query frame ``i``
        sees key frame ``j`` iff ``j // frames_per_block <= i // frames_per_block`` (``frames`` must be a
        multiple of ``frames_per_block``). Built from the frame table, O(frames x per-frame budget)."""
        frames = _check_frames(frames)
        tokens_per_frame = as_int("tokens_per_frame", tokens_per_frame, 1)
        frames_per_block = as_int("frames_per_block", frames_per_block, 1)
        if frames % frames_per_block:
            raise ArgumentError(f"frames_per_block: the {frames} frames are not a multiple of {frames_per_block}")
        return _causal_cached(self, frames, tokens_per_frame, self.rotation_offset(frames, step), frames_per_block)

    def reset(self) -> None:
        """`VideoPattern`: nothing to drop (LVSA plans are pure functions of the call)."""

    def plan_call(self, q: object, k: object, call: AttentionCall) -> AttentionPlan:
        """`VideoPattern`: the plan of one call (q and k are not read): `plan` over the call's grid and text,
        or `causal_plan` with ``call.causal_block``; ``call.leading_frames`` join the first frames."""
        pattern = self
        if call.leading_frames:
            pattern = dataclasses.replace(self, n_first=self.n_first + call.leading_frames)
        if call.causal_block:
            if call.text_tokens:
                raise ArgumentError(f"text_tokens: a block-causal plan is video-only, got {call.text_tokens}")
            layout = pattern.causal_plan(call.frames, call.tokens_per_frame, call.step, call.causal_block)
        else:
            layout = pattern.plan(call.frames, call.tokens_per_frame, call.step, call.text_tokens, call.text_position)
        return AttentionPlan(layout)

    def summary(self, plan: AttentionPlan) -> Tuple[str, str]:
        """`VideoPattern`: what ran ("LVSA engaged" or "LVSA dense") and the plan's fields for a log line."""
        layout = plan.blocks
        meta = layout.meta
        return ("LVSA dense" if layout.is_dense else "LVSA engaged",
                f"text={meta.get('text_tokens', 0)} kfi={meta['kfi']} offset={meta['offset']} "
                f"density={layout.density:.4f} reference_frames={self.reference_frames}")

    def describe(self, frames: int, step: int = 0) -> str:
        """One-line summary at ``frames`` latent frames: kfi, offset, |G|, |A| range, frame density."""
        ptr, _ = self.frame_rows(frames, step)
        per_row = ptr[1:] - ptr[:-1]
        density = float(ptr[-1]) / (frames * frames)
        return (f"LVSA T={frames} W={self.window} n_first={self.n_first} ref={self.reference_frames} "
                f"scale={self.sparsity_scale} kfi={self.key_frame_interval_for(frames)} "
                f"offset={self.rotation_offset(frames, step)} |G|={len(self.global_frames(frames, step))} "
                f"|A|={int(per_row.min())}..{int(per_row.max())} frame density={density:.4f}")


@functools.lru_cache(maxsize=256)
def _plan_cached(pattern: LVSAPattern, T: int, P: int, offset: int, L: int, pos: str) -> BlockSparseLayout:
    kfi = pattern.key_frame_interval_for(T)
    g = global_anchor_frames(T, pattern.n_first, kfi, offset, pattern.anchors)
    values, valid = _frame_table(T, pattern.window, g, pattern.expand_window)
    meta = {"pattern": "lvsa", "frames": T, "tokens_per_frame": P, "kfi": kfi, "offset": offset,
            "global_frames": g, "window": pattern.window, "n_first": pattern.n_first,
            "reference_frames": pattern.reference_frames, "text_tokens": L}
    sizes = [P] * T
    if L == 0:
        meta["global_kv_blocks"] = g
        ptr, cols = _csr(values, valid)
        text_block = None
    else:  # one text block: every video row also attends it, the text row attends every block
        text = torch.full((T, 1), T if pos == "after" else 0, dtype=torch.int32)
        everything = torch.arange(T + 1, dtype=torch.int32)
        on = torch.ones(T, 1, dtype=torch.bool)
        if pos == "after":
            ptr, cols = _csr(torch.cat([values, text], 1), torch.cat([valid, on], 1))
            ptr, cols = torch.cat([ptr, ptr[-1:] + T + 1]), torch.cat([cols, everything])
            sizes = sizes + [L]
        else:
            ptr, cols = _csr(torch.cat([text, values + 1], 1), torch.cat([on, valid], 1))
            ptr, cols = torch.cat([ptr.new_zeros(1), ptr + T + 1]), torch.cat([everything, cols])
            sizes = [L] + sizes
        meta["global_kv_blocks"] = tuple(x + 1 for x in g) if pos == "before" else g  # the text block comes first
        meta.update(text_position=pos)
        t = T if pos == "after" else 0
        text_block = TextBlock(t, t)
    offsets = _as_offsets(sizes, "block sizes")
    return BlockSparseLayout(offsets, offsets, ptr.to(torch.int32)[None], cols, meta, text_block)


@functools.lru_cache(maxsize=64)
def _causal_cached(pattern: LVSAPattern, T: int, P: int, offset: int, n: int) -> BlockSparseLayout:
    kfi = pattern.key_frame_interval_for(T)
    g = global_anchor_frames(T, pattern.n_first, kfi, offset, pattern.anchors)
    values, valid = _frame_table(T, pattern.window, g, pattern.expand_window)
    valid = valid & (values.long() // n <= torch.arange(T)[:, None] // n)
    ptr, cols = _csr(values, valid)
    meta = {**_plan_cached(pattern, T, P, offset, 0, "after").meta, "causal_block": n}
    offsets = _as_offsets([P] * T, "block sizes")
    return BlockSparseLayout(offsets, offsets, ptr.to(torch.int32)[None], cols, meta)


def _check_frames(frames: int) -> int:
    return as_int("frames (latent frames)", frames, 1)

