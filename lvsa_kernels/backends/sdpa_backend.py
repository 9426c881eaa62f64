"""`sdpa` backend: dense `torch.nn.functional.scaled_dot_product_attention` for fully dense layouts."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Backend, Capabilities, register


class SDPABackend(Backend):
    name = "sdpa"
    caps = Capabilities(devices=frozenset({"cpu", "cuda", "npu"}),
                        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
                        head_dims=None, lse=False, dense_only=True, backward=True)

    def run(self, q, k, v, layout, scale, return_lse):
        gqa = k.shape[2] != q.shape[2]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2), None


register(SDPABackend())
