"""`enable_lvsa` / `disable_lvsa`: install and remove the LVSA processors on a diffusers pipeline or transformer."""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from diffusers import (Cosmos3OmniTransformer, HunyuanVideoFramepackTransformer3DModel, LatteTransformer3DModel,
                       SanaVideoTransformer3DModel, WanAnimate2Transformer3DModel)
import torch
from torch import Tensor, nn

from ..api import check_precision
from ..backends import get_backend
from ..reference import LVSAPattern
from ..svoo_attention import SVOOPattern
from ..models import MODELS, ModelPreset
from .geometry import geometry_from_latents
from .parallel import context_groups
from .riflex import install_riflex
from .runtime import AttentionRuntime, ModelSpec

__all__ = ["enable_lvsa", "enable_svoo", "disable_lvsa", "LVSAHandle", "SUPPORTED_MODELS"]

log = logging.getLogger("lvsa_kernels")


def _adapter_spec(preset: ModelPreset) -> ModelSpec:
    """The `ModelSpec` of ``preset`` in its adapter module ``lvsa_kernels.diffusers.<preset.adapter>``."""
    module = importlib.import_module(f"{__package__}.{preset.adapter}")
    found = [v for v in vars(module).values() if isinstance(v, ModelSpec) and v.model == preset.name]
    if len(found) != 1:
        raise ImportError(f"{module.__name__}: expected one ModelSpec with model={preset.name!r} (the model table's "
                          f"row), found {len(found)}")
    return found[0]


# one adapter per row of the model table, in table order
SUPPORTED_MODELS: Tuple[ModelSpec, ...] = tuple(_adapter_spec(p) for p in MODELS.values())
_KNOBS = tuple(f.name for f in dataclasses.fields(LVSAPattern))
_ATTR = "_lvsa_handle"
_PIPELINE_CLASSES: Dict[type, type] = {}


class LVSAHandle:
    """What `enable_lvsa` installed; `disable` undoes it exactly.

    Attributes:
        runtime: the shared `AttentionRuntime` (``runtime.pattern``, ``runtime.tracker.step``, ...).
        transformers: the transformers that run LVSA (two for Wan 2.2 A14B).
        pipeline: the pipeline given to `enable_lvsa`, or None.
    """

    def __init__(self, runtime: AttentionRuntime, transformers: Sequence[nn.Module], pipeline: Optional[Any],
                 spec: ModelSpec) -> None:
        self.runtime = runtime
        self.spec = spec
        self.transformers = list(transformers)
        self.pipeline = pipeline
        self._originals: List[Tuple[nn.Module, Any]] = []
        self._hooks: List[Any] = []
        self._pipeline_class: Optional[type] = None

    @property
    def active(self) -> bool:
        return bool(self._originals)

    def new_generation(self) -> None:
        """Restart the rotation at step 0 (done automatically at each pipeline call)."""
        self.runtime.tracker.new_generation()

    def begin_call(self, kwargs: Dict[str, Any]) -> None:
        """At each pipeline call: a new generation, and the call's leading conditioning frames (reference
        images) become extra LVSA first frames."""
        self.new_generation()
        if self.spec.leading_frames is not None:
            self.runtime.leading_frames = self.spec.leading_frames(kwargs)

    def disable(self) -> None:
        """Restore the original processor objects, remove the hooks and the pipeline call wrapper.

        A parallel config that diffusers' ``enable_parallelism`` set on the LVSA processor (called after
        ``enable_lvsa``) is passed on to the restored processor, which then runs its own context parallelism.
        """
        for attn, processor in self._originals:
            parallel_config = getattr(attn.processor, "_parallel_config", None)
            if parallel_config is not None:
                processor._parallel_config = parallel_config
            _set_processor(attn, processor)
        for hook in self._hooks:
            hook.remove()
        if self._pipeline_class is not None:
            self.pipeline.__class__ = self._pipeline_class
        for obj in [self.pipeline, *self.transformers]:
            if obj is not None and obj.__dict__.get(_ATTR) is self:
                del obj.__dict__[_ATTR]
        self.runtime.step_marker = None
        self._originals, self._hooks, self._pipeline_class = [], [], None


# transformers that enable_lvsa recognises but does not run, with the reason
UNSUPPORTED_MODELS: Dict[type, str] = {
    LatteTransformer3DModel: (
        "Latte factorises attention: its blocks alternate spatial self-attention within each frame and temporal "
        "self-attention across frames at each position, so no attention is joint over all video tokens and there "
        "is no frame x frame block structure for LVSA to sparsify"),
    SanaVideoTransformer3DModel: (
        "SANA-Video's video self-attention is linear attention (ReLU feature maps, no softmax), which has no "
        "attention matrix to make block-sparse"),
    HunyuanVideoFramepackTransformer3DModel: (
        "FramePack prepends compressed history tokens (4x, 2x and 1x downsampled clean latents, each with its own "
        "tokens per frame) to a short fixed-length section, so the sequence has no uniform frame grid, and FramePack "
        "already bounds the context per section"),
    WanAnimate2Transformer3DModel: (
        "Wan-Animate-2's self-attention is already structured sparse attention: each generation frame attends the "
        "generation tokens plus a KV-cached reference segment at the same frame index, through a flex BlockMask "
        "over a rectangular [generation | reference] key buffer"),
    Cosmos3OmniTransformer: (
        "Cosmos 3 packs one un-batched sequence (causal text pathway, then video / sound / action tokens placed by "
        "index) and its generation queries attend [text; generation] keys, which needs a rectangular "
        "(query != key) LVSA layout over the vision_token_shapes grid; no adapter yet"),
}


def _set_processor(attn: nn.Module, processor: Any) -> None:
    """``attn.set_processor(processor)``, or the plain attribute for attention modules without that method
    (Mochi's ``MochiAttention``)."""
    if hasattr(attn, "set_processor"):
        attn.set_processor(processor)
    else:
        attn.processor = processor


def _spec_for(transformer: Any) -> ModelSpec:
    by_class = {spec.transformer_cls: spec for spec in SUPPORTED_MODELS}
    for cls in type(transformer).__mro__:  # the most derived supported class
        if cls in by_class:
            return by_class[cls]
    for cls, reason in UNSUPPORTED_MODELS.items():
        if isinstance(transformer, cls):
            raise NotImplementedError(f"LVSA ({cls.__name__}): not supported: {reason}. "
                                      "Run it with its own attention (do not call enable_lvsa).")
    names = ", ".join(s.transformer_cls.__name__ for s in SUPPORTED_MODELS)
    raise TypeError(f"pipe_or_transformer: expected a pipeline with a supported transformer or one of {names}; "
                    f"got {type(transformer).__name__}")


def _split(pipe_or_transformer: Any) -> Tuple[Optional[Any], List[nn.Module]]:
    if isinstance(pipe_or_transformer, nn.Module):
        return None, [pipe_or_transformer]
    experts = [getattr(pipe_or_transformer, name, None) for name in ("transformer", "transformer_2")]
    experts = [t for t in experts if t is not None]
    if not experts:
        raise TypeError(f"pipe_or_transformer: {type(pipe_or_transformer).__name__} is neither a transformer nor "
                        "a pipeline with a .transformer")
    return pipe_or_transformer, experts


def _make_pattern(spec: ModelSpec, config: Any, pattern: Optional[LVSAPattern],
                  knobs: Dict[str, Any]) -> Tuple[LVSAPattern, str]:
    unknown = sorted(set(knobs) - set(_KNOBS))
    if unknown:
        raise TypeError(f"enable_lvsa: unknown knob(s) {unknown}; valid knobs: {list(_KNOBS)}")
    if pattern is not None:
        if not isinstance(pattern, LVSAPattern):
            raise TypeError(f"pattern: expected an LVSAPattern, an SVOOPattern or None, got {type(pattern).__name__}")
        source = "reference_frames knob" if "reference_frames" in knobs else "given pattern"
        return dataclasses.replace(pattern, **knobs), source
    if "reference_frames" in knobs:
        return spec.preset.pattern(**knobs), "reference_frames knob"
    ref, source = spec.reference_frames(config)
    return spec.preset.pattern(**{"reference_frames": ref, **knobs}), source


def _pipeline_class(cls: type) -> type:
    """A subclass of ``cls`` (same name) whose ``__call__`` starts a new LVSA generation first.

    ``pipe(...)`` looks ``__call__`` up on the class, so wrapping the instance attribute would not work.
    """
    if cls not in _PIPELINE_CLASSES:
        def __call__(self, *args, **kwargs):
            handle = self.__dict__.get(_ATTR)
            if handle is not None:
                handle.begin_call(kwargs)
            return cls.__call__(self, *args, **kwargs)

        __call__.__doc__ = cls.__call__.__doc__
        _PIPELINE_CLASSES[cls] = type(cls.__name__, (cls,), {
            "__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return _PIPELINE_CLASSES[cls]


def _attention_heads(attn: nn.Module) -> int:
    """Heads of a self-attention module (``heads``; Kandinsky's modules call it ``num_heads``)."""
    return int(attn.heads if hasattr(attn, "heads") else attn.num_heads)


def _forward_hooks(runtime: AttentionRuntime, spec: ModelSpec, transformer: nn.Module, expert: int) -> List[Any]:
    signature = inspect.signature(type(transformer).forward)
    patch = spec.patch(transformer.config)
    heads = _attention_heads(spec.self_attention(transformer)[0][1])

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        # runs before diffusers' context-parallel split hooks, so it sees the unsplit (global) input
        bound = signature.bind_partial(module, *args, **kwargs).arguments
        if "hidden_states" not in bound or "timestep" not in bound:
            raise ValueError(f"LVSA ({spec.name}): the transformer call needs hidden_states and timestep")
        if spec.geometry is not None:
            geometry = spec.geometry(bound, patch)
        else:
            geometry = geometry_from_latents(bound["hidden_states"], spec.frame_dim, patch)
        parallel_config = getattr(module, "_parallel_config", None)
        context = context_groups(parallel_config, heads, geometry, spec.name, spec.context_parallel,
                                 runtime.pattern.per_layer)
        runtime.begin_forward(geometry, bound["timestep"], context, expert)

    def post_hook(module: nn.Module, args: tuple, output: Any) -> None:
        checkpointed = torch.is_grad_enabled() and bool(getattr(module, "gradient_checkpointing", False))
        runtime.end_forward(_first_tensor(output), checkpointed)

    return [transformer.register_forward_pre_hook(pre_hook, with_kwargs=True),
            transformer.register_forward_hook(post_hook, always_call=True)]


def _first_tensor(output: Any) -> Optional[Tensor]:
    """The sample of a transformer's output (a tensor, a tuple starting with it, or a diffusers output object);
    None when the forward raised (``always_call`` hooks then get None)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    sample = getattr(output, "sample", None)
    return sample if isinstance(sample, Tensor) else None


def _make_runtime(spec: ModelSpec, transformers: Sequence[nn.Module], pattern: Union[None, LVSAPattern, SVOOPattern],
                  backend: str, knobs: Dict[str, Any], precision: str) -> AttentionRuntime:
    if isinstance(pattern, SVOOPattern):
        if knobs:
            raise TypeError(f"enable_lvsa: LVSA knob(s) {sorted(knobs)} do not apply to an SVOOPattern; "
                            "set SVOO knobs on the pattern (or use enable_svoo(pipe, **svoo_knobs))")
        if not spec.svoo:
            svoo = ", ".join(f"{s.name} ({s.preset.diffusers_class})" for s in SUPPORTED_MODELS if s.svoo)
            raise NotImplementedError(f"SVOO ({spec.name}): the SVOO pattern is supported on {svoo} only; use an "
                                      "LVSAPattern for this model")
        return AttentionRuntime(pattern, backend, spec.name, "given SVOOPattern", precision, len(transformers))
    lvsa_pattern, source = _make_pattern(spec, transformers[0].config, pattern, knobs)
    return AttentionRuntime(lvsa_pattern, backend, spec.name, source, precision, len(transformers))


def _riflex_hooks(spec: ModelSpec, transformer: nn.Module, runtime: AttentionRuntime) -> List[Any]:
    rope, temporal_channels = spec.rope(transformer)
    reference = (runtime.pattern.reference_frames if isinstance(runtime.pattern, LVSAPattern)
                 else spec.reference_frames(transformer.config)[0])
    return [install_riflex(rope, temporal_channels, spec.patch(transformer.config), reference)]


def enable_lvsa(pipe_or_transformer: Any, pattern: Union[None, LVSAPattern, SVOOPattern] = None,
                backend: str = "auto", riflex: bool = False, precision: str = "exact", **knobs: Any) -> LVSAHandle:
    """Run the self-attention of a diffusers video transformer with LVSA block-sparse attention.

    Supported: the transformer of every row of the model table (`SUPPORTED_MODELS`): Wan 2.1 / 2.2 (both
    A14B experts), Wan VACE, SkyReels-V2 (also diffusion forcing), ChronoEdit, Wan 2.2 Animate, HunyuanVideo 1.0
    and 1.5, Mochi, Motif-Video (joint attention, padded text after the video), CogVideoX, ConsisID, EasyAnimate
    (joint attention, text first), LTX-Video, LTX-2, Cosmos, Allegro, Kandinsky 5 and 6 (video-only
    self-attention). `UNSUPPORTED_MODELS` are refused with the reason. See ``docs/models.md``.

    Args:
        pipe_or_transformer: a pipeline (uses ``.transformer`` and ``.transformer_2`` when present, and
            restarts the rotation at each pipeline call) or a bare transformer (a new generation is
            detected when the timestep increases; or call ``handle.new_generation()``).
        pattern: an `LVSAPattern` (latent-frame units); default: window 3, n_first 1 and the model's
            reference frames (config ``sample_frames`` / ``sample_n_frames`` when present, else Wan 21,
            Wan2.2-TI2V-5B 31, HunyuanVideo 1.5 33; CogVideoX from its ``sample_frames``, 13 for 5B).
            Or an `SVOOPattern` (models whose spec has ``svoo``: self-attention joint over all video tokens,
            text after the video if any; Wan also under Ulysses; no ``knobs``): each self-attention call runs
            ``pattern.attention`` with the denoising step, the block index as layer and the transformer call's
            index within the step as CFG branch (0, 1; with two experts ``(expert, call)``, so the experts never
            share clusters);
            the pattern's caches are reset at each new generation.
        backend: ``block_sparse_attn`` backend, ``"auto"`` or a registered name.
        riflex: RIFLEx (Wan, HunyuanVideo): past the reference frames ``L`` (the pattern's, else the model's),
            the temporal RoPE component whose period is closest to ``L`` gets frequency ``2*pi / T`` for a
            ``T``-frame video (`lvsa_kernels.diffusers.riflex`); `disable_lvsa` restores the original RoPE.
        precision: ``block_sparse_attn`` precision: ``"exact"`` (default), ``"fp8"`` or ``"int8_qk"`` (opt-in
            8-bit attention, Triton backend on sm_89+ GPUs; see docs/fp8.md). SVOO with an 8-bit precision runs
            on host-built layouts (the packed cluster kernel has no 8-bit mode).
        **knobs: `LVSAPattern` fields that override the pattern (window, n_first, reference_frames,
            sparsity_scale, key_frame_interval, expand_window, rotate, anchors).

    Raises:
        NotImplementedError: an `SVOOPattern` on a model without SVOO support (text first, leading reference
            frames, block-causal masks); ``riflex`` on a model without a supported RoPE; a transformer in
            `UNSUPPORTED_MODELS` (Cosmos 3, Latte, SANA-Video, FramePack, Wan-Animate-2), with the reason.

    Returns:
        An `LVSAHandle`; ``disable_lvsa(pipe_or_transformer)`` or ``handle.disable()`` restores everything.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
    if not isinstance(riflex, bool):
        raise TypeError(f"riflex: expected a bool, got {type(riflex).__name__}")
    if backend != "auto":
        get_backend(backend)  # unknown names fail here, not at the first denoising step
    check_precision(precision)
    pipeline, transformers = _split(pipe_or_transformer)
    specs = [_spec_for(t) for t in transformers]
    if any(s is not specs[0] for s in specs):
        raise TypeError("pipe_or_transformer: transformer and transformer_2 must be the same model family")
    for obj in [pipeline, *transformers]:
        if obj is not None and _ATTR in obj.__dict__:
            raise RuntimeError(f"enable_lvsa: LVSA is already enabled on this {type(obj).__name__}; "
                               "call disable_lvsa() first")
    spec = specs[0]
    if riflex and spec.rope is None:
        raise NotImplementedError(f"riflex ({spec.name}): RIFLEx is supported on Wan and HunyuanVideo models only "
                                  "(their RoPE layouts are known); call enable_lvsa(..., riflex=False)")
    runtime = _make_runtime(spec, transformers, pattern, backend, knobs, precision)
    handle = LVSAHandle(runtime, transformers, pipeline, spec)

    for transformer in transformers:
        for name, attn in spec.self_attention(transformer):
            if not isinstance(attn.processor, spec.original_processors):
                raise TypeError(
                    f"enable_lvsa: {name} uses {type(attn.processor).__name__}; LVSA replaces only "
                    f"{[c.__name__ for c in spec.original_processors]}"
                )
    for expert, transformer in enumerate(transformers):
        for layer, (_, attn) in enumerate(spec.self_attention(transformer)):
            handle._originals.append((attn, attn.processor))
            _set_processor(attn, spec.processor_cls(runtime, layer))
        handle._hooks += _forward_hooks(runtime, spec, transformer, expert)
        if riflex:
            handle._hooks += _riflex_hooks(spec, transformer, runtime)
        transformer.__dict__[_ATTR] = handle
    if pipeline is not None:
        if spec.step_marker is not None:
            runtime.step_marker = lambda: spec.step_marker(pipeline)
        handle._pipeline_class = type(pipeline)
        pipeline.__class__ = _pipeline_class(type(pipeline))
        pipeline.__dict__[_ATTR] = handle
    what = (f"LVSA {runtime.pattern} (reference_frames from {runtime.reference_source})"
            if isinstance(runtime.pattern, LVSAPattern) else "SVOO")
    log.debug("%s installed on %d %s self-attention layers, backend %s", what, len(handle._originals), spec.name,
              backend)
    return handle


def enable_svoo(pipe_or_transformer: Any, backend: str = "auto", precision: str = "exact",
                **svoo_knobs: Any) -> LVSAHandle:
    """``enable_lvsa(pipe_or_transformer, pattern=SVOOPattern(**svoo_knobs), backend=backend, precision=precision)``.

    ``svoo_knobs``: `SVOOPattern` arguments (profile, top_p, q_clusters, k_clusters, iterations,
    warmup_steps, dense_layers, recluster_every, clip, seed). Undo with `disable_lvsa`.
    """
    return enable_lvsa(pipe_or_transformer, pattern=SVOOPattern(**svoo_knobs), backend=backend, precision=precision)


def disable_lvsa(pipe_or_transformer: Any) -> None:
    """Undo `enable_lvsa` on the pipeline or transformer it was given (or one of that pipeline's
    transformers): the original processor objects come back, hooks and the call wrapper go."""
    handle = getattr(pipe_or_transformer, "__dict__", {}).get(_ATTR)
    if handle is None:
        raise ValueError(f"disable_lvsa: LVSA is not enabled on this {type(pipe_or_transformer).__name__}")
    handle.disable()
