"""A CPU stand-in for ``torch_npu`` (test helper; never used in production).

Implements ``npu_fusion_attention`` and ``npu_block_sparse_attention`` on CPU tensors with SDPA semantics
(softmax(q k^T * scale) v, float32 math) and the NPU conventions documented by Ascend:

* ``npu_fusion_attention``: ``input_layout="BSND"``; ``atten_mask`` bool, True = masked out; returns
  ``(out, softmax_max [B, N, S, 8], softmax_sum [B, N, S, 8], softmax_out, seed, offset, numels)``;
* ``npu_block_sparse_attention``: ``BNSD``; ``block_sparse_mask`` ``[B, N, ceil(Sq/X), ceil(Skv/Y)]``,
  1 = compute; ``Y`` a multiple of 128; fp16/bf16; bf16 needs ``inner_precise=0``; head dim 64/128;
  returns ``(out, softmax_lse [B, N, Sq, 1])`` (natural log).

Every call is recorded in ``module.calls`` as ``(op name, dict of arguments)``. `install` puts the module in
``sys.modules`` and a fake ``torch.npu`` (``is_available() -> True``) on torch, through pytest's monkeypatch.
The module sets ``LVSA_KERNELS_CPU_STANDIN = True``, which lets the NPU backend accept CPU tensors.
"""
from __future__ import annotations

import sys
import types
from importlib.machinery import ModuleSpec

import torch

from lvsa_kernels.npu.detect import CPU_STANDIN_ATTR


def _attention(q, k, v, keep, scale):
    """q [B, N, Sq, D], k/v [B, Nkv, Skv, D], keep bool broadcastable to [B, N, Sq, Skv] (True = compute).

    Returns out [B, N, Sq, D] (q dtype), row max and row sum of exp (float32, [B, N, Sq])."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    s = torch.matmul(q.float(), kk.transpose(-1, -2)) * scale
    s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    out = torch.matmul(p, vv) / denom.clamp_min(1e-30)
    return out.to(q.dtype), m.squeeze(-1), denom.squeeze(-1)


def make_standin() -> types.ModuleType:
    mod = types.ModuleType("torch_npu")
    mod.__spec__ = ModuleSpec("torch_npu", None)
    mod.calls = []
    setattr(mod, CPU_STANDIN_ATTR, True)

    def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                             atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=2147483647,
                             next_tockens=2147483647, inner_precise=0, prefix=None, actual_seq_qlen=None,
                             actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False,
                             softmax_layout=""):
        mod.calls.append(("npu_fusion_attention", dict(
            q_shape=tuple(query.shape), k_shape=tuple(key.shape), head_num=head_num, input_layout=input_layout,
            atten_mask=atten_mask, scale=scale, keep_prob=keep_prob, sparse_mode=sparse_mode)))
        if input_layout != "BSND":
            raise NotImplementedError("stand-in implements input_layout='BSND' only")
        if query.shape[2] != head_num or head_num % key.shape[2]:
            raise RuntimeError(f"head_num={head_num}: query has {query.shape[2]} heads, key {key.shape[2]}")
        keep = torch.ones(1, dtype=torch.bool) if atten_mask is None else ~atten_mask.bool()
        out, m, s = _attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), keep, scale)
        m8, s8 = m[..., None].expand(*m.shape, 8), s[..., None].expand(*s.shape, 8)
        return out.transpose(1, 2), m8, s8, torch.empty(0), 0, 0, 0

    def npu_block_sparse_attention(query, key, value, block_sparse_mask, block_shape, *, q_input_layout="TND",
                                   kv_input_layout="TND", num_key_value_heads=1, scale_value=0.0, inner_precise=1,
                                   actual_seq_lengths=None, actual_seq_lengths_kv=None, softmax_lse_flag=0):
        mod.calls.append(("npu_block_sparse_attention", dict(
            q_shape=tuple(query.shape), k_shape=tuple(key.shape), mask=block_sparse_mask.clone(),
            block_shape=list(block_shape), num_key_value_heads=num_key_value_heads, scale_value=scale_value,
            inner_precise=inner_precise, softmax_lse_flag=softmax_lse_flag)))
        if (q_input_layout, kv_input_layout) != ("BNSD", "BNSD"):
            raise NotImplementedError("stand-in implements BNSD only")
        x, y = block_shape
        B, N, Sq, D = query.shape
        Skv = key.shape[2]
        if y % 128 or query.dtype not in (torch.float16, torch.bfloat16) or D not in (64, 128):
            raise RuntimeError(f"unsupported: block_shape={block_shape}, dtype={query.dtype}, head_dim={D}")
        if query.dtype == torch.bfloat16 and inner_precise != 0:
            raise RuntimeError("bf16 requires inner_precise=0")
        if key.shape[1] != num_key_value_heads or N % num_key_value_heads:
            raise RuntimeError(f"num_key_value_heads={num_key_value_heads} does not fit key {tuple(key.shape)}")
        if tuple(block_sparse_mask.shape) != (B, N, -(-Sq // x), -(-Skv // y)):
            raise RuntimeError(f"block_sparse_mask shape {tuple(block_sparse_mask.shape)} does not fit")
        keep = block_sparse_mask.bool().repeat_interleave(x, 2)[:, :, :Sq].repeat_interleave(y, 3)[..., :Skv]
        out, m, s = _attention(query, key, value, keep, scale_value)
        lse = (m + torch.log(s))[..., None] if softmax_lse_flag else torch.empty(0)
        return out, lse

    mod.npu_fusion_attention = npu_fusion_attention
    mod.npu_block_sparse_attention = npu_block_sparse_attention
    return mod


def install(monkeypatch, available: bool = True) -> types.ModuleType:
    """Inject a fresh stand-in as ``torch_npu`` and a fake ``torch.npu``; both are undone by monkeypatch."""
    mod = make_standin()
    monkeypatch.setitem(sys.modules, "torch_npu", mod)
    npu = types.SimpleNamespace(is_available=lambda: available, synchronize=lambda: None,
                                get_device_name=lambda: "Ascend stand-in (CPU)")
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    return mod
