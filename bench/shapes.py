"""Benchmark cases: model attention shapes x LVSA patterns, in priority order.

A case is one self-attention call: ``[B, S, H, D]`` inputs with ``S = frames * tokens_per_frame + text_tokens``
(text after the video) and the layout ``pattern.plan(frames, tokens_per_frame, text_tokens=...)``.
``frames`` is in latent frames. The GPU list starts with the performance-anchor configuration
(Wan 2.1 1.3B, LVSA W=4, n_first=1, ref=21 at T=121 and 81) so a cut time budget drops the least important.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch

from lvsa_kernels.models import MODELS
from lvsa_kernels.reference import BlockSparseLayout, LVSAPattern

__all__ = ["BenchCase", "GPU_CASES", "CPU_SMOKE_CASES", "GROUPS", "select_cases"]


@dataclass(frozen=True)
class BenchCase:
    """One benchmarked attention call (shapes in tokens, ``frames`` in latent frames)."""

    name: str
    model: str
    frames: int
    tokens_per_frame: int
    heads: int
    head_dim: int
    pattern: LVSAPattern = field(default_factory=LVSAPattern)
    text_tokens: int = 0
    kv_heads: int = 0            # 0 = same as heads
    batch: int = 1
    dtype: torch.dtype = torch.bfloat16

    @property
    def seq_len(self) -> int:
        """Tokens per sequence: video tokens plus trailing text tokens."""
        return self.frames * self.tokens_per_frame + self.text_tokens

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def pattern_label(self) -> str:
        p = self.pattern
        return f"W={p.window} n_first={p.n_first} ref={p.reference_frames}"

    def layout(self) -> BlockSparseLayout:
        """The LVSA layout of this case (cached by the planner)."""
        return self.pattern.plan(self.frames, self.tokens_per_frame, text_tokens=self.text_tokens)

    def describe(self) -> Dict[str, object]:
        """JSON-ready description of the case."""
        return {
            "name": self.name, "model": self.model, "frames": self.frames,
            "tokens_per_frame": self.tokens_per_frame, "text_tokens": self.text_tokens,
            "tokens": self.seq_len, "batch": self.batch, "heads": self.heads, "kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "dtype": str(self.dtype).replace("torch.", ""), "pattern": self.pattern_label,
        }


_WAN = "Wan 2.1 1.3B"      # case labels (results files group by them)
_HY = "HunyuanVideo 1.5"
_WAN_MODEL, _HY_MODEL = MODELS["wan"], MODELS["hunyuan15"]  # geometry and LVSA defaults: the model table


def _wan(frames: int, pattern: LVSAPattern, tag: str) -> BenchCase:
    m = _WAN_MODEL
    return BenchCase(f"wan{tag}-t{frames}", _WAN, frames, m.tokens_per_frame(), m.heads, m.head_dim, pattern)


def _hy(frames: int) -> BenchCase:
    m = _HY_MODEL  # text after the video (the table's text position); 256 valid text tokens
    return BenchCase(f"hy15-t{frames}", _HY, frames, m.tokens_per_frame(), m.heads, m.head_dim, m.pattern(),
                     text_tokens=256)


GPU_CASES: Tuple[BenchCase, ...] = (
    _wan(121, _WAN_MODEL.pattern(window=4), "-w4"),
    _wan(81, _WAN_MODEL.pattern(window=4), "-w4"),
    *(_wan(t, _WAN_MODEL.pattern(), "") for t in (21, 41, 81, 121)),
    *(_hy(t) for t in (33, 49, 65)),
)

# Tiny float32 cases for the CPU plumbing check: a dense pattern, a sparse one, a sparse one with text.
CPU_SMOKE_CASES: Tuple[BenchCase, ...] = (
    BenchCase("tiny-dense-t3", "tiny", 3, 16, 2, 64, LVSAPattern(window=1, reference_frames=4), dtype=torch.float32),
    BenchCase("tiny-t8", "tiny", 8, 16, 2, 64, LVSAPattern(window=1, reference_frames=2), dtype=torch.float32),
    BenchCase("tiny-text-t8", "tiny", 8, 16, 2, 64, LVSAPattern(window=1, reference_frames=2), text_tokens=8,
              dtype=torch.float32),
)

GROUPS: Dict[str, Tuple[str, ...]] = {
    "all": tuple(c.name for c in GPU_CASES),
    "anchor": ("wan-w4-t121", "wan-w4-t81"),
    "wan": tuple(c.name for c in GPU_CASES if c.model == _WAN),
    "wan-default": tuple(c.name for c in GPU_CASES if c.model == _WAN and c.pattern.window == 3),
    "hy15": tuple(c.name for c in GPU_CASES if c.model == _HY),
    "smoke": tuple(c.name for c in CPU_SMOKE_CASES),
}


def select_cases(spec: str) -> List[BenchCase]:
    """Cases named by ``spec``: comma-separated case names or group names (see `GROUPS`), in list order."""
    by_name = {c.name: c for c in GPU_CASES + CPU_SMOKE_CASES}
    chosen: List[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        names = GROUPS.get(item, (item,))
        for n in names:
            if n not in by_name:
                raise ValueError(f"--cases: unknown case or group {n!r}; cases: {sorted(by_name)}, "
                                 f"groups: {sorted(GROUPS)}")
            if n not in chosen:
                chosen.append(n)
    if not chosen:
        raise ValueError("--cases: no case selected")
    return [by_name[n] for n in chosen]
