"""The runtime shared by the attention processors of one `enable_lvsa` call, and the processors' common base.

`AttentionRuntime` holds the pattern (any `VideoPattern`: `LVSAPattern`, `SVOOPattern`), the backend, the step
tracker, and the geometry and context-parallel groups of the transformer call in flight (set by a forward
pre-hook from the unsplit input). Each attention call is described to the pattern as an `AttentionCall` (grid,
step, layer, branch, text, heads) and runs the plan it returns through `block_sparse_attn`, under Ulysses inside
the one all-to-all exchange (`exchanged`), under ring attention through the layout-aware ring (`ring_attention`).
Patterns whose plans do not depend on q and k (``per_layer = False``, LVSA) are planned once per step and shared
by every layer and rank; the others (SVOO) plan per call, keyed by ``branch``: the transformer call's index
within the step (0, 1 for the two classifier-free-guidance calls; ``(expert, call)`` with two experts; plus the
batch part for per-element calls). The pattern is reset at each
new generation. The first attention call of a generation logs one INFO summary line.
"""
from __future__ import annotations

import dataclasses
import logging
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, List, Optional, Tuple, Type, Union

import torch
from torch import Tensor, nn

from ..api import block_sparse_attn
from ..dispatch import select_backend
from ..models import ModelPreset, get_model
from ..reference import BlockSparseLayout
from ..reference.eager import eager
from ..reference.plan import AttentionCall, AttentionPlan, VideoPattern
from ..ring import TrafficCounter, ring_attention
from .geometry import VideoGeometry, check_video_tokens
from .parallel import ContextGroups, heads_to_seq, seq_to_heads
from .state import StepTracker

__all__ = ["AttentionRuntime", "LVSAProcessorBase", "ModelSpec"]

log = logging.getLogger("lvsa_kernels")


class AttentionRuntime:
    """State shared by all installed processors: pattern, backend, step tracker, the transformer call in flight.

    Args:
        pattern: the sparsity pattern, a `VideoPattern` (`LVSAPattern` in latent-frame units, `SVOOPattern`).
        backend: ``block_sparse_attn`` backend name or ``"auto"``.
        model: model family name used in messages ("Wan", "HunyuanVideo 1.5", "CogVideoX").
        reference_source: where the pattern's settings came from (logged).
        precision: ``block_sparse_attn`` precision (``"exact"``, ``"fp8"``, ``"int8_qk"``).
        experts: transformers sharing the runtime (2 for Wan 2.2 A14B): the branch is then ``(expert, call)``.

    Attributes:
        densities: layout density per ``(step, text_tokens, text_position)`` planned in the current generation
            (patterns planned once per step; `plan_densities` covers the others).
        chosen_backend: the backend ``backend`` resolved to at the generation's first attention call (patterns
            planned once per step; per-call plans resolve per call).
        leading_frames: conditioning frames before the video (reference images) in the current pipeline call.
        ring_traffic: key/value bytes this rank sent through ring attention vs a dense ring's (`TrafficCounter`,
            summed over the calls since `enable_lvsa`).
    """

    def __init__(self, pattern: VideoPattern, backend: str, model: str, reference_source: str = "given pattern",
                 precision: str = "exact", experts: int = 1) -> None:
        self.pattern = pattern
        self.backend = backend
        self.model = model
        self.reference_source = reference_source
        self.precision = precision
        self.experts = experts
        self.tracker = StepTracker()
        self.geometry: Optional[VideoGeometry] = None
        self.context: Optional[ContextGroups] = None
        self.in_forward = False
        self._awaiting_backward: Optional[weakref.ref] = None  # output of a checkpointed call, until its backward
        self.ring_traffic = TrafficCounter()
        self.expert = 0
        self.forward_cache: Dict[str, Any] = {}
        self.step_marker: Optional[Callable[[], Any]] = None
        self.densities: Dict[Tuple[int, int, str], float] = {}
        self.chosen_backend: Optional[str] = None
        self.leading_frames = 0
        self._plans: Dict[AttentionCall, AttentionPlan] = {}
        self._planned_for: Optional[Tuple[int, Optional[int], VideoGeometry]] = None

    # ------------------------------------------------------------------ transformer call boundaries
    def begin_forward(self, geometry: VideoGeometry, timestep: Any, context: Optional[ContextGroups] = None,
                      expert: int = 0) -> None:
        """Called by the transformer's forward pre-hook: record the step, the global geometry, the
        context-parallel groups (None without context parallelism) and which transformer (expert) runs. With a
        ``step_marker`` (the pipeline's own step counter) that returns an object, the step follows it
        instead of the timestep. A new generation resets the pattern; a new step or geometry drops the plans.
        Raises while a gradient-checkpointed call's output still awaits its backward (see `end_forward`)."""
        pending = None if self._awaiting_backward is None else self._awaiting_backward()
        if pending is not None and torch.is_grad_enabled():
            raise RuntimeError(
                f"LVSA ({self.model}): a transformer call started before the backward of the previous "
                "gradient-checkpointed call; its blocks would be recomputed with this call's video geometry and "
                "layout. Run backward() after each call (or turn gradient checkpointing off)")
        marker = None if self.step_marker is None else self.step_marker()
        if marker is None:
            self.tracker.observe(timestep)
        else:
            self.tracker.observe_marker(marker)
        self.geometry = geometry
        self.context = context
        self.in_forward = True
        self.expert = expert
        self.forward_cache.clear()
        key = (self.tracker.generation, self.tracker.step, geometry)
        if key != self._planned_for:
            if self._planned_for is None or self._planned_for[0] != key[0]:
                self.pattern.reset()
                self.densities.clear()
            self._plans.clear()
            self._planned_for = key

    def end_forward(self, output: Optional[Tensor] = None, checkpointed: bool = False) -> None:
        """Called by the transformer's forward hook (also when the forward raised, ``output`` None): no geometry
        outside a transformer call, except in the backward of a call that ran with grad enabled, where gradient
        checkpointing recomputes its blocks: the geometry, context groups, step and plans stay those of the
        latest call. ``checkpointed`` (grad enabled and the transformer checkpoints its blocks): until the
        backward reaches ``output`` (or ``output`` is freed), the next grad-enabled call raises instead of
        replacing them."""
        self.in_forward = False
        if not torch.is_grad_enabled():
            self.geometry = None
            self.context = None
        elif output is not None:  # a call that raised (e.g. refused here) leaves the waiting one as it was
            self._awaiting_backward = None
            if checkpointed and output.requires_grad:
                self._awaiting_backward = weakref.ref(output)
                output.register_hook(self._backward_reached)
        self.forward_cache.clear()

    def _backward_reached(self, grad: Tensor) -> None:
        self._awaiting_backward = None

    def current_geometry(self, where: str) -> VideoGeometry:
        """The geometry of the transformer call in flight (or recomputed in a backward); raises outside one."""
        in_backward = torch._C._current_graph_task_id() != -1  # what torch.utils.checkpoint itself checks
        if self.geometry is None or not (self.in_forward or in_backward):
            raise RuntimeError(
                f"LVSA ({where}): attention was called outside a forward of the transformer that "
                "enable_lvsa() was given, so the video geometry is unknown"
            )
        return self.geometry

    # ------------------------------------------------------------------ planning and attention
    def call(self, layer: int = 0, text_tokens: int = 0, text_position: str = "after", part: Optional[int] = None,
             causal_block: int = 0, heads: Optional[Tuple[int, int]] = None) -> AttentionCall:
        """The `AttentionCall` of layer ``layer`` in the transformer call in flight (see `attention`)."""
        geo = self.current_geometry("plan")
        branch: Hashable = self.tracker.call if self.experts == 1 else (self.expert, self.tracker.call)
        if part is not None:
            branch = (branch, part)
        return AttentionCall(geo.frames, geo.tokens_per_frame, self.tracker.step, layer, branch, text_tokens,
                             text_position, heads, self.leading_frames, causal_block, self.backend)

    def plan(self, q: Optional[Tensor], k: Optional[Tensor], call: AttentionCall) -> AttentionPlan:
        """The pattern's plan for ``call``; patterns planned once per step are cached per step (the key drops
        the layer, branch and heads) and their densities recorded."""
        if self.pattern.per_layer:
            return self.pattern.plan_call(q, k, call)
        key = dataclasses.replace(call, layer=0, branch=None, heads=None)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self.pattern.plan_call(None, None, key)
            where = call.text_position if not call.causal_block else f"causal{call.causal_block}"
            self.densities[(call.step, call.text_tokens, where)] = plan.blocks.density
        return plan

    def layout(self, text_tokens: int = 0, text_position: str = "after") -> BlockSparseLayout:
        """The current step's layout over the video plus ``text_tokens`` text tokens (patterns planned once per
        step only)."""
        if self.pattern.per_layer:
            raise TypeError(f"layout: {type(self.pattern).__name__} plans per call from q and k; use attention()")
        return self.plan(None, None, self.call(text_tokens=text_tokens, text_position=text_position)).blocks

    def attention(self, q: Tensor, k: Tensor, v: Tensor, layer: int, text_tokens: int = 0,
                  text_position: str = "after", part: Optional[int] = None, causal_block: int = 0) -> Tensor:
        """Sparse attention of layer ``layer``: q, k, v ``[B, S, H, D]`` -> ``[B, S, H, D]`` (this rank's shards
        under Ulysses), with ``text_tokens`` valid text tokens ``text_position`` the video. ``part`` numbers the
        calls one transformer call makes for different text lengths (one per batch element), None for one call;
        ``causal_block``: frames per block of a block-causal frame mask (diffusion forcing), 0 = none."""
        def run(q: Tensor, k: Tensor, v: Tensor, heads: Optional[Tuple[int, int]]) -> Tensor:
            call = self.call(layer, text_tokens, text_position, part, causal_block, heads)
            if self.pattern.per_layer:
                return self._plan_and_run(q, k, v, call)
            return self._run(q, k, v, self.plan(q, k, call))

        return self.exchanged(q, k, v, run)

    @eager  # per-call plans update the pattern's caches: a compiled model graph-breaks around plan + attention
    def _plan_and_run(self, q: Tensor, k: Tensor, v: Tensor, call: AttentionCall) -> Tensor:
        return self._run(q, k, v, self.pattern.plan_call(q, k, call))

    def video_attention(self, q: Tensor, k: Tensor, v: Tensor, layer: int) -> Tensor:
        """Video-only self-attention of layer ``layer``: q, k, v ``[B, S, H, D]`` -> ``[B, S, H, D]``."""
        return self.attention(q, k, v, layer)

    def joint_attention(self, q: Tensor, k: Tensor, v: Tensor, layer: int, text_tokens: int,
                        part: Optional[int] = None) -> Tensor:
        """Attention over ``[video; text_tokens valid text tokens]`` (text after the video) of layer ``layer``."""
        return self.attention(q, k, v, layer, text_tokens, "after", part)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, plan: Union[BlockSparseLayout, AttentionPlan]) -> Tensor:
        """``block_sparse_attn`` on ``[B, S, H, D]`` tensors with a given full-sequence ``plan`` (under Ulysses
        through `exchanged`)."""
        plan = plan if isinstance(plan, AttentionPlan) else AttentionPlan(plan)
        return self.exchanged(q, k, v, lambda q, k, v, heads: self._run(q, k, v, plan))

    def plan_densities(self) -> List[float]:
        """Densities of the plans of the current generation: per step (`densities`) or the pattern's own cache."""
        if self.pattern.per_layer:
            return list(self.pattern.cached_densities().values())
        return list(self.densities.values())

    def exchanged(self, q: Tensor, k: Tensor, v: Tensor,
                  attend: Callable[[Tensor, Tensor, Tensor, Optional[Tuple[int, int]]], Tensor]) -> Tensor:
        """``attend(q, k, v, heads)`` over this rank's ring shard, the one place the Ulysses exchange happens.

        Without Ulysses, ``heads`` is None and q, k, v ``[B, S_r, H, D]`` pass through (the full sequence
        without context parallelism). Under Ulysses (degree N) q, k, v are this rank's ``[B, S_r/N, H, D]``
        pieces: they are exchanged to ``[B, S_r, H/N, D]``, attended with ``heads = (first, total)`` (this
        rank's global heads) and the output is exchanged back, so the result is this rank's
        ``[B, S_r/N, H, D]`` piece of the one-GPU output. ``S_r`` is the ring shard (S without ring attention).
        """
        ug = None if self.context is None else self.context.ulysses
        if ug is None:
            return attend(q, k, v, None)
        q, k, v = seq_to_heads([q, k, v], ug, "q/k/v")
        return heads_to_seq(attend(q, k, v, (ug.rank * q.shape[2], ug.degree * q.shape[2])), ug)

    def _run(self, q: Tensor, k: Tensor, v: Tensor, plan: AttentionPlan) -> Tensor:
        ring = None if self.context is None else self.context.ring
        if ring is not None:  # context_groups refused per-call (permuted) patterns under ring attention
            out = ring_attention(q, k, v, plan.blocks, ring.group, ring.shards(plan.blocks.q_len),
                                 backend=self.backend, precision=self.precision, counter=self.ring_traffic)
        else:
            blocks = plan if plan.permuted else plan.blocks  # a plain layout goes as is
            out = block_sparse_attn(q, k, v, blocks, backend=self.backend, precision=self.precision)
        if not self.tracker.announced:
            self._announce(q, k, v, plan)
        return out

    def _announce(self, q: Tensor, k: Tensor, v: Tensor, plan: AttentionPlan) -> None:
        self.tracker.announced = True
        geo = self.current_geometry("log")
        if self.pattern.per_layer:
            chosen = "per call"
        elif self.context is not None and self.context.ring is not None:
            chosen = "per ring part"
        else:
            chosen = select_backend(self.backend, q, k, v, plan.blocks, q.shape[-1] ** -0.5, False,
                                    self.precision).name
            self.chosen_backend = chosen
        what, fields = self.pattern.summary(plan)
        cp = self.context
        log.info("%s on %s: T=%d P=%d %s backend=%s (requested %s) pattern from %s ulysses_degree=%d ring_degree=%d "
                 "precision=%s", what, self.model, geo.frames, geo.tokens_per_frame, fields, chosen, self.backend,
                 self.reference_source, 1 if cp is None or cp.ulysses is None else cp.ulysses.degree,
                 1 if cp is None or cp.ring is None else cp.ring.degree, self.precision)


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
        cp = self.runtime.context
        check_video_tokens(geo, video_tokens, self.where, 1 if cp is None else cp.degree, 0 if cp is None else cp.rank)
        return geo


@dataclass(frozen=True)
class ModelSpec:
    """How to install LVSA on one transformer family: the diffusers-specific part of a model-table row.

    Attributes:
        name: family name used in messages.
        model: the model's key in the model table (`lvsa_kernels.models.MODELS`), which names the diffusers
            transformer class (`transformer_cls`) and holds the geometry and LVSA defaults.
        processor_cls: the LVSA processor class (constructed with the runtime and the layer index).
        original_processors: processor classes that may be replaced.
        self_attention: the transformer's self-attention modules as ``(name, module)`` pairs.
        frame_dim: latent frame axis of the transformer input (2 for ``[B, C, T, H, W]``).
        patch: ``(p_t, p_h, p_w)`` from the transformer config.
        reference_frames: default reference frames (token frames) and where they came from.
        context_parallel: whether the processor runs under diffusers' context parallelism (Ulysses, ring, both).
        rope: for RIFLEx, the transformer's RoPE module and its temporal channel count; None when the
            model's RoPE is not supported.
        leading_frames: from a pipeline call's keyword arguments, the conditioning latent frames the
            pipeline puts before the video (Wan VACE reference images); they join the LVSA first frames.
        step_marker: from the pipeline, an object it replaces once per denoising iteration (or None
            outside its loop); the denoising step then follows the pipeline instead of the timestep.
        geometry: the token grid from the transformer call's bound arguments and the patch, for transformers
            whose input is not a ``[B, C, T, H, W]`` / ``[B, T, C, H, W]`` latent video (LTX-Video's packed
            ``[B, S, C]`` tokens, Kandinsky's channels-last latents); None = from the latents.
        svoo: whether its processor runs an `SVOOPattern` (through `video_attention` / `joint_attention`).
    """

    name: str
    model: str
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
    geometry: Optional[Callable[[Dict[str, Any], Tuple[int, int, int]], VideoGeometry]] = None
    svoo: bool = False

    @property
    def preset(self) -> ModelPreset:
        """The model's row in the model table."""
        return get_model(self.model)

    @property
    def transformer_cls(self) -> Type[nn.Module]:
        """The diffusers transformer class the table row names."""
        import diffusers

        return getattr(diffusers, self.preset.diffusers_class)
