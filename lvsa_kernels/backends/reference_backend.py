"""`reference` backend: the exact PyTorch reference (any device, any dtype; slow)."""
from __future__ import annotations

import torch

from ..reference import reference_attention
from .base import Backend, Capabilities, register


class ReferenceBackend(Backend):
    name = "reference"
    caps = Capabilities(devices=frozenset({"cpu", "cuda", "npu"}),
                        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
                        head_dims=None, backward=True)  # plain PyTorch ops: autograd differentiates them

    def run(self, q, k, v, layout, scale, return_lse):
        if return_lse:
            return reference_attention(q, k, v, layout, scale=scale, return_lse=True)
        return reference_attention(q, k, v, layout, scale=scale), None


register(ReferenceBackend())
