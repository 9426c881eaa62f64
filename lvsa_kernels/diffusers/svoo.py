"""SVOO on Wan's self-attention and HunyuanVideo 1.5's joint attention through the diffusers shim.

Each ``attn1`` call runs ``pattern.attention(q, k, v, step, layer, backend, branch)`` with the denoising
step from the shared `StepTracker`, the block index as ``layer`` and the index of the transformer call
within the step as ``branch`` (0 and 1 for the two classifier-free-guidance calls, so each branch has
its own cluster cache; a CFG batch in one call is branch 0 and every batch element gets its own
clusters; with Wan 2.2's two experts the branch is ``(expert, call)``, so each expert has its own caches
and its first call clusters). The pattern's caches are dropped at each new generation. Wan 2.1 / 2.2,
also under diffusers' Ulysses context parallelism (each rank clusters its own heads over the full sequence);
HunyuanVideo 1.5 through `joint_attention` (video clustered, the valid text one extra block after it).
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

from torch import Tensor, nn

from ..svoo_attention import SVOOPattern
from .geometry import VideoGeometry
from .parallel import UlyssesGroup
from .runtime import AttentionRuntime, ModelSpec

__all__ = ["SVOORuntime", "check_svoo_supported"]

log = logging.getLogger("lvsa_kernels")


def check_svoo_supported(spec: ModelSpec, transformers: Sequence[nn.Module]) -> None:
    """Raise NotImplementedError unless SVOO can run on ``transformers`` (Wan 2.1 / 2.2, HunyuanVideo 1.5)."""
    if not spec.svoo:
        raise NotImplementedError(
            f"SVOO ({spec.name}): the SVOO pattern is supported on Wan (WanTransformer3DModel) and HunyuanVideo 1.5 "
            "(HunyuanVideo15Transformer3DModel) only; use an LVSAPattern for this model"
        )


class SVOORuntime(AttentionRuntime):
    """Runs every installed Wan ``attn1`` processor through an `SVOOPattern`.

    Args:
        pattern: the SVOO pattern (its caches are reset at each new generation).
        backend: ``block_sparse_attn`` backend name or ``"auto"``.
        model: model family name used in messages.
        experts: transformers sharing the runtime (2 for Wan 2.2 A14B): the branch passed to the pattern
            is then ``(expert, call)``, so each expert has its own cluster caches.
        precision: ``block_sparse_attn`` precision passed to ``pattern.attention``.
    """

    def __init__(self, pattern: SVOOPattern, backend: str, model: str, experts: int = 1,
                 precision: str = "exact") -> None:
        super().__init__(pattern, backend, model, precision)
        self.experts = experts
        self._generation: Optional[int] = None

    def begin_forward(self, geometry: VideoGeometry, timestep: Any, ulysses: Optional[UlyssesGroup] = None,
                      expert: int = 0) -> None:
        """As `AttentionRuntime.begin_forward`; the first call of a generation resets the SVOO caches."""
        super().begin_forward(geometry, timestep, ulysses, expert)
        if self.tracker.generation != self._generation:
            self.pattern.reset()
            self._generation = self.tracker.generation

    def video_attention(self, q: Tensor, k: Tensor, v: Tensor, layer: int) -> Tensor:
        """``pattern.attention`` on q, k, v ``[B, S, H, D]`` at the current step, this layer and CFG branch."""
        return self._attention(q, k, v, layer)

    def joint_attention(self, q: Tensor, k: Tensor, v: Tensor, layer: int, text_tokens: int,
                        part: Optional[int] = None) -> Tensor:
        """``pattern.attention`` over ``[video; text]`` (HunyuanVideo 1.5): the video part is clustered, the
        ``text_tokens`` valid text tokens after it form one block (see `SVOOPattern.plan`). Calls for different
        text lengths within one transformer call (``part``: the batch element) keep separate caches."""
        return self._attention(q, k, v, layer, text_tokens, part)

    def _attention(self, q: Tensor, k: Tensor, v: Tensor, layer: int, text_tokens: int = 0,
                   part: Optional[int] = None) -> Tensor:
        """The pattern's attention with this call's step and branch. Under Ulysses (degree N) the inputs are
        this rank's ``[B, S/N, H, D]`` shards: they are exchanged to ``[B, S, H/N, D]``, clustered and attended
        for this rank's heads (profile floors and cluster seeds of the global heads, so the result equals one
        GPU's) and exchanged back."""
        self.current_geometry("SVOO")
        if not self.tracker.announced:
            self._announce()
        branch = self.tracker.call if self.experts == 1 else (self.expert, self.tracker.call)
        if part is not None:
            branch = (branch, part)
        return self.exchanged(q, k, v, lambda q, k, v, heads: self.pattern.attention(
            q, k, v, step=self.tracker.step, layer=layer, backend=self.backend, branch=branch, heads=heads,
            text_tokens=text_tokens, precision=self.precision))

    def _announce(self) -> None:
        self.tracker.announced = True
        p = self.pattern
        geo = self.current_geometry("log")
        log.info(
            "SVOO on %s: T=%d P=%d top_p=%g q_clusters=%d k_clusters=%d iterations=%d warmup_steps=%d "
            "recluster_every=%d dense_layers=%s profile=%s backend=%s",
            self.model, geo.frames, geo.tokens_per_frame, p.top_p, p.q_clusters, p.k_clusters, p.iterations,
            p.warmup_steps, p.recluster_every, sorted(p.dense_layers), "yes" if p.profile is not None else "none",
            self.backend,
        )
