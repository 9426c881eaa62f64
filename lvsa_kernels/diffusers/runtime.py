"""State shared by the LVSA processors of one `enable_lvsa` call, and the processors' common base.

An `AttentionRuntime` holds the pattern, the backend, the step tracker, and the geometry and Ulysses
group of the transformer call in flight (set by a forward pre-hook from the unsplit input). `LVSARuntime`
plans layouts once per (step, geometry, text length), shared by every layer and every rank; the SVOO
runtime (`lvsa_kernels.diffusers.svoo`) plans per layer from q and k. The first attention call of a
generation logs one INFO summary line.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

import torch
from torch import Tensor, nn

from ..api import block_sparse_attn
from ..dispatch import select_backend
from ..reference import BlockSparseLayout, LVSAPattern
from .geometry import VideoGeometry, check_video_tokens
from .parallel import UlyssesGroup, heads_to_seq, seq_to_heads
from .state import StepTracker

__all__ = ["AttentionRuntime", "LVSARuntime", "LVSAProcessorBase", "ModelSpec"]

log = logging.getLogger("lvsa_kernels")


class AttentionRuntime:
    """State shared by all installed processors: backend, step tracker and the transformer call in flight.

    Subclasses say how the video self-attention of one layer runs (`video_attention`).

    Args:
        pattern: the sparsity pattern (`LVSAPattern` or `SVOOPattern`).
        backend: ``block_sparse_attn`` backend name or ``"auto"``.
        model: model family name used in messages ("Wan", "HunyuanVideo 1.5", "CogVideoX").
        precision: ``block_sparse_attn`` precision (``"exact"``, ``"fp8"``, ``"int8_qk"``).
    """

    def __init__(self, pattern: Any, backend: str, model: str, precision: str = "exact") -> None:
        self.pattern = pattern
        self.backend = backend
        self.model = model
        self.precision = precision
        self.tracker = StepTracker()
        self.geometry: Optional[VideoGeometry] = None
        self.ulysses: Optional[UlyssesGroup] = None
        self.expert = 0
        self.forward_cache: Dict[str, Any] = {}
        self.step_marker: Optional[Callable[[], Any]] = None

    # ------------------------------------------------------------------ transformer call boundaries
    def begin_forward(self, geometry: VideoGeometry, timestep: Any, ulysses: Optional[UlyssesGroup] = None,
                      expert: int = 0) -> None:
        """Called by the transformer's forward pre-hook: record the step, the global geometry, the
        Ulysses group (None without context parallelism) and which transformer (expert) runs. With a
        ``step_marker`` (the pipeline's own step counter) that returns an object, the step follows it
        instead of the timestep."""
        marker = None if self.step_marker is None else self.step_marker()
        if marker is None:
            self.tracker.observe(timestep)
        else:
            self.tracker.observe_marker(marker)
        self.geometry = geometry
        self.ulysses = ulysses
        self.expert = expert
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

    def exchanged(self, q: Tensor, k: Tensor, v: Tensor,
                  attend: Callable[[Tensor, Tensor, Tensor, Optional[Tuple[int, int]]], Tensor]) -> Tensor:
        """``attend(q, k, v, heads)`` over the full sequence, the one place the Ulysses exchange happens.

        Without Ulysses, ``heads`` is None and q, k, v ``[B, S, H, D]`` pass through. Under Ulysses (degree N)
        q, k, v are this rank's ``[B, S/N, H, D]`` shards: they are exchanged to ``[B, S, H/N, D]``, attended
        with ``heads = (first, total)`` (this rank's global heads) and the output is exchanged back, so the
        result is this rank's ``[B, S/N, H, D]`` shard of the one-GPU output.
        """
        ug = self.ulysses
        if ug is None:
            return attend(q, k, v, None)
        q, k, v = seq_to_heads([q, k, v], ug, "q/k/v")
        return heads_to_seq(attend(q, k, v, (ug.rank * q.shape[2], ug.degree * q.shape[2])), ug)

    def video_attention(self, q: Tensor, k: Tensor, v: Tensor, layer: int) -> Tensor:
        """Video-only self-attention of layer ``layer``: q, k, v ``[B, S, H, D]`` -> ``[B, S, H, D]``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement video_attention")

    def joint_attention(self, q: Tensor, k: Tensor, v: Tensor, layer: int, text_tokens: int,
                        part: Optional[int] = None) -> Tensor:
        """Attention over ``[video; text_tokens valid text tokens]`` (text after the video) of layer ``layer``:
        ``[B, S, H, D]`` -> ``[B, S, H, D]``. ``part`` numbers the calls one transformer call makes for
        different text lengths (one per batch element), None for a single call."""
        raise NotImplementedError(f"{type(self).__name__} does not implement joint_attention")


class LVSARuntime(AttentionRuntime):
    """Pattern, backend, step and current geometry shared by all installed LVSA processors.

    Args:
        pattern: the LVSA pattern (latent-frame units).
        backend: ``block_sparse_attn`` backend name or ``"auto"``.
        model: model family name used in messages ("Wan", "HunyuanVideo 1.5", "CogVideoX").
        reference_source: where ``pattern.reference_frames`` came from (logged).
        precision: ``block_sparse_attn`` precision.

    Attributes:
        densities: layout density per planned ``(step, text_tokens, text_position)`` of the current generation.
        chosen_backend: the backend ``backend`` resolved to at the generation's first attention call.
        leading_frames: conditioning frames before the video (reference images) in the current pipeline
            call; the layout's first frames are ``pattern.n_first + leading_frames``.
    """

    def __init__(self, pattern: LVSAPattern, backend: str, model: str, reference_source: str,
                 precision: str = "exact") -> None:
        super().__init__(pattern, backend, model, precision)
        self.reference_source = reference_source
        self._layouts: Dict[Tuple[Any, ...], BlockSparseLayout] = {}
        self._planned_for: Optional[Tuple[int, Optional[int], VideoGeometry]] = None
        self.densities: Dict[Tuple[int, int, str], float] = {}
        self.chosen_backend: Optional[str] = None
        self.leading_frames = 0

    def begin_forward(self, geometry: VideoGeometry, timestep: Any, ulysses: Optional[UlyssesGroup] = None,
                      expert: int = 0) -> None:
        """As `AttentionRuntime.begin_forward`; layouts are re-planned when the step or geometry changes."""
        super().begin_forward(geometry, timestep, ulysses, expert)
        key = (self.tracker.generation, self.tracker.step, geometry)
        if key != self._planned_for:
            if self._planned_for is None or self._planned_for[0] != key[0]:
                self.densities.clear()
            self._layouts.clear()
            self._planned_for = key

    # ------------------------------------------------------------------ planning and attention
    def layout(self, text_tokens: int = 0, text_position: str = "after") -> BlockSparseLayout:
        """The layout of the current step over ``T*P`` video tokens plus ``text_tokens`` text tokens."""
        key = (text_tokens, text_position, self.leading_frames)
        layout = self._layouts.get(key)
        if layout is None:
            geo = self.current_geometry("layout")
            layout = self._pattern().plan(geo.frames, geo.tokens_per_frame, step=self.tracker.step,
                                          text_tokens=text_tokens, text_position=text_position)
            self._layouts[key] = layout
            self.densities[(self.tracker.step, text_tokens, text_position)] = layout.density
        return layout

    def _pattern(self) -> LVSAPattern:
        """The pattern with the call's leading conditioning frames added to its first frames."""
        if not self.leading_frames:
            return self.pattern
        return dataclasses.replace(self.pattern, n_first=self.pattern.n_first + self.leading_frames)

    def causal_layout(self, frames_per_block: int) -> BlockSparseLayout:
        """The current step's video layout intersected with the block-causal frame mask of diffusion forcing:
        query frame ``i`` sees key frame ``j`` iff ``j // frames_per_block <= i // frames_per_block``
        (a ``[T, T]`` frame mask, never a token-level one)."""
        key = ("causal", frames_per_block, self.leading_frames)
        layout = self._layouts.get(key)
        if layout is None:
            geo = self.current_geometry("layout")
            T, P = geo.frames, geo.tokens_per_frame
            if T % frames_per_block:
                raise ValueError(f"LVSA ({self.model}): diffusion forcing needs the {T} token frames to be a multiple "
                                 f"of num_frame_per_block={frames_per_block}")
            pattern, step = self._pattern(), self.tracker.step
            block = torch.arange(T) // frames_per_block
            mask = pattern.frame_mask(T, step) & (block[None, :] <= block[:, None])
            meta = {**pattern.plan(T, P, step=step).meta, "causal_block": frames_per_block}
            layout = BlockSparseLayout.from_block_mask(mask, [P] * T, [P] * T, meta)
            self._layouts[key] = layout
            self.densities[(self.tracker.step, 0, f"causal{frames_per_block}")] = layout.density
        return layout

    def video_attention(self, q: Tensor, k: Tensor, v: Tensor, layer: int) -> Tensor:
        """LVSA attention over the video tokens with the current step's layout (same for every layer)."""
        return self.attend(q, k, v, self.layout())

    def joint_attention(self, q: Tensor, k: Tensor, v: Tensor, layer: int, text_tokens: int,
                        part: Optional[int] = None) -> Tensor:
        """LVSA attention over ``[video; text]`` with the step's layout for ``text_tokens`` text tokens after the video."""
        return self.attend(q, k, v, self.layout(text_tokens=text_tokens, text_position="after"))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout) -> Tensor:
        """``block_sparse_attn`` on ``[B, S, H, D]`` tensors with the runtime's backend and the full-sequence
        ``layout`` (under Ulysses through `exchanged`)."""
        def run(q: Tensor, k: Tensor, v: Tensor, heads: Optional[Tuple[int, int]]) -> Tensor:
            out = block_sparse_attn(q, k, v, layout, backend=self.backend, precision=self.precision)
            if not self.tracker.announced:
                self._announce(q, k, v, layout)
            return out

        return self.exchanged(q, k, v, run)

    def _announce(self, q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout) -> None:
        self.tracker.announced = True
        geo = self.current_geometry("log")
        chosen = select_backend(self.backend, q, k, v, layout, q.shape[-1] ** -0.5, False, self.precision).name
        self.chosen_backend = chosen
        meta = layout.meta
        log.info(
            "LVSA %s on %s: T=%d P=%d text=%d kfi=%d offset=%d density=%.4f backend=%s (requested %s) "
            "reference_frames=%d (%s) ulysses_degree=%d precision=%s",
            "dense" if layout.is_dense else "engaged", self.model, geo.frames, geo.tokens_per_frame,
            meta.get("text_tokens", 0), meta["kfi"], meta["offset"], layout.density, chosen, self.backend,
            self.pattern.reference_frames, self.reference_source, 1 if self.ulysses is None else self.ulysses.degree,
            self.precision,
        )


class LVSAProcessorBase:
    """Common part of the LVSA attention processors (one instance per attention layer; ``layer`` is its
    0-based index in the transformer).

    ``_attention_backend`` / ``_parallel_config`` exist because diffusers' ``set_attention_backend`` and
    ``enable_parallelism`` set them on every processor; the backend is ignored (``enable_lvsa``'s backend
    applies) and context parallelism is read from the transformer by the forward pre-hook (the same
    config, and it is also there when ``enable_lvsa`` runs after ``enable_parallelism``).
    """

    _attention_backend = None
    _parallel_config = None
    where = "processor"

    def __init__(self, runtime: AttentionRuntime, layer: int) -> None:
        self.runtime = runtime
        self.layer = layer

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
        processor_cls: the LVSA processor class (constructed with the runtime and the layer index).
        original_processors: processor classes that may be replaced.
        self_attention: the transformer's self-attention modules as ``(name, module)`` pairs.
        frame_dim: latent frame axis of the transformer input (2 for ``[B, C, T, H, W]``).
        patch: ``(p_t, p_h, p_w)`` from the transformer config.
        reference_frames: default reference frames (token frames) and where they came from.
        context_parallel: whether the processor runs under diffusers' Ulysses context parallelism.
        rope: for RIFLEx, the transformer's RoPE module and its temporal channel count; None when the
            model's RoPE is not supported.
        leading_frames: from a pipeline call's keyword arguments, the conditioning latent frames the
            pipeline puts before the video (Wan VACE reference images); they join the LVSA first frames.
        step_marker: from the pipeline, an object it replaces once per denoising iteration (or None
            outside its loop); the denoising step then follows the pipeline instead of the timestep.
        geometry: the token grid from the transformer call's bound arguments, for transformers whose input
            is not a 5-D latent video (LTX-Video's packed ``[B, S, C]`` tokens); None = from the latents.
        svoo: whether its processor runs an `SVOOPattern` (through `video_attention` / `joint_attention`).
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
    rope: Optional[Callable[[nn.Module], Tuple[nn.Module, int]]] = None
    leading_frames: Optional[Callable[[Dict[str, Any]], int]] = None
    step_marker: Optional[Callable[[Any], Any]] = None
    geometry: Optional[Callable[[Dict[str, Any]], VideoGeometry]] = None
    svoo: bool = False
