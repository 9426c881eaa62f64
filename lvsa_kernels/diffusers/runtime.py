"""State shared by the LVSA processors of one `enable_lvsa` call, and the processors' common base.

A `LVSARuntime` holds the pattern, the backend, the step tracker, and the geometry and Ulysses group of
the transformer call in flight (set by a forward pre-hook from the unsplit input). Layouts are planned
once per (step, geometry, text length) and shared by every layer and every rank; the first attention
call of a generation logs one INFO summary line.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

from torch import Tensor, nn

from ..api import block_sparse_attn
from ..dispatch import select_backend
from ..reference import BlockSparseLayout, LVSAPattern
from .geometry import VideoGeometry, check_video_tokens
from .parallel import UlyssesGroup, heads_to_seq, seq_to_heads
from .state import StepTracker

__all__ = ["LVSARuntime", "LVSAProcessorBase", "ModelSpec"]

log = logging.getLogger("lvsa_kernels")


class LVSARuntime:
    """Pattern, backend, step and current geometry shared by all installed processors.

    Args:
        pattern: the LVSA pattern (latent-frame units).
        backend: ``block_sparse_attn`` backend name or ``"auto"``.
        model: model family name used in messages ("Wan", "HunyuanVideo 1.5", "CogVideoX").
        reference_source: where ``pattern.reference_frames`` came from (logged).
    """

    def __init__(self, pattern: LVSAPattern, backend: str, model: str, reference_source: str) -> None:
        self.pattern = pattern
        self.backend = backend
        self.model = model
        self.reference_source = reference_source
        self.tracker = StepTracker()
        self.geometry: Optional[VideoGeometry] = None
        self.ulysses: Optional[UlyssesGroup] = None
        self.forward_cache: Dict[str, Any] = {}
        self._layouts: Dict[Tuple[int, str], BlockSparseLayout] = {}
        self._planned_for: Optional[Tuple[int, Optional[int], VideoGeometry]] = None

    # ------------------------------------------------------------------ transformer call boundaries
    def begin_forward(self, geometry: VideoGeometry, timestep: Any, ulysses: Optional[UlyssesGroup] = None) -> None:
        """Called by the transformer's forward pre-hook: record the step, the global geometry and the
        Ulysses group (None without context parallelism)."""
        self.tracker.observe(timestep)
        key = (self.tracker.generation, self.tracker.step, geometry)
        if key != self._planned_for:
            self._layouts.clear()
            self._planned_for = key
        self.geometry = geometry
        self.ulysses = ulysses
        self.forward_cache.clear()

    def end_forward(self) -> None:
        """Called by the transformer's forward hook: no geometry outside a transformer call."""
        self.geometry = None
        self.ulysses = None
        self.forward_cache.clear()

    def current_geometry(self, where: str) -> VideoGeometry:
        """The geometry of the transformer call in flight; raises outside one."""
        if self.geometry is None:
            raise RuntimeError(
                f"LVSA ({where}): attention was called outside a forward of the transformer that "
                "enable_lvsa() was given, so the video geometry is unknown"
            )
        return self.geometry

    # ------------------------------------------------------------------ planning and attention
    def layout(self, text_tokens: int = 0, text_position: str = "after") -> BlockSparseLayout:
        """The layout of the current step over ``T*P`` video tokens plus ``text_tokens`` text tokens."""
        key = (text_tokens, text_position)
        layout = self._layouts.get(key)
        if layout is None:
            geo = self.current_geometry("layout")
            layout = self.pattern.plan(geo.frames, geo.tokens_per_frame, step=self.tracker.step,
                                       text_tokens=text_tokens, text_position=text_position)
            self._layouts[key] = layout
        return layout

    def attend(self, q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout) -> Tensor:
        """``block_sparse_attn`` on ``[B, S, H, D]`` tensors with the runtime's backend.

        Under Ulysses (degree N) the inputs are this rank's ``[B, S/N, H, D]`` shards: they are exchanged
        to ``[B, S, H/N, D]``, attended with the full-sequence ``layout`` and exchanged back, so the
        result is this rank's ``[B, S/N, H, D]`` shard of the one-GPU output.
        """
        ug = self.ulysses
        if ug is not None:
            q, k, v = seq_to_heads([q, k, v], ug, "q/k/v")
        out = block_sparse_attn(q, k, v, layout, backend=self.backend)
        if not self.tracker.announced:
            self._announce(q, k, v, layout)
        return out if ug is None else heads_to_seq(out, ug)

    def _announce(self, q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout) -> None:
        self.tracker.announced = True
        geo = self.current_geometry("log")
        chosen = select_backend(self.backend, q, k, v, layout, q.shape[-1] ** -0.5, False).name
        meta = layout.meta
        log.info(
            "LVSA %s on %s: T=%d P=%d text=%d kfi=%d offset=%d density=%.4f backend=%s (requested %s) "
            "reference_frames=%d (%s) ulysses_degree=%d",
            "dense" if layout.is_dense else "engaged", self.model, geo.frames, geo.tokens_per_frame,
            meta.get("text_tokens", 0), meta["kfi"], meta["offset"], layout.density, chosen, self.backend,
            self.pattern.reference_frames, self.reference_source, 1 if self.ulysses is None else self.ulysses.degree,
        )


class LVSAProcessorBase:
    """Common part of the LVSA attention processors (one instance per attention layer).

    ``_attention_backend`` / ``_parallel_config`` exist because diffusers' ``set_attention_backend`` and
    ``enable_parallelism`` set them on every processor; the backend is ignored (``enable_lvsa``'s backend
    applies) and context parallelism is read from the transformer by the forward pre-hook (the same
    config, and it is also there when ``enable_lvsa`` runs after ``enable_parallelism``).
    """

    _attention_backend = None
    _parallel_config = None
    where = "processor"

    def __init__(self, runtime: LVSARuntime) -> None:
        self.runtime = runtime

    def _geometry(self, video_tokens: int) -> VideoGeometry:
        """The global geometry of the call in flight, checked against the ``video_tokens`` this rank holds."""
        geo = self.runtime.current_geometry(self.where)
        shards = 1 if self.runtime.ulysses is None else self.runtime.ulysses.degree
        check_video_tokens(geo, video_tokens, self.where, shards)
        return geo


@dataclass(frozen=True)
class ModelSpec:
    """How to install LVSA on one transformer family.

    Attributes:
        name: family name used in messages.
        transformer_cls: the diffusers transformer class.
        processor_cls: the LVSA processor class (constructed with the runtime).
        original_processors: processor classes that may be replaced.
        self_attention: the transformer's self-attention modules as ``(name, module)`` pairs.
        frame_dim: latent frame axis of the transformer input (2 for ``[B, C, T, H, W]``).
        patch: ``(p_t, p_h, p_w)`` from the transformer config.
        reference_frames: default reference frames (token frames) and where they came from.
        context_parallel: whether the processor runs under diffusers' Ulysses context parallelism.
    """

    name: str
    transformer_cls: Type[nn.Module]
    processor_cls: Type[LVSAProcessorBase]
    original_processors: Tuple[type, ...]
    self_attention: Callable[[nn.Module], List[Tuple[str, nn.Module]]]
    frame_dim: int
    patch: Callable[[Any], Tuple[int, int, int]]
    reference_frames: Callable[[Any], Tuple[int, str]]
    context_parallel: bool = False
