"""`npu` backend: block-sparse attention on Ascend through torch_npu.

Two ways to run a layout, chosen per problem class by measurement (`lvsa_kernels.choice.timed_choice`,
the same hook and cache file as the CUDA backends):

* ``fusion`` - `npu_fusion_attention` once per group of query blocks that share one key-span list
  (`span_groups`), input layout ``BSND``, on the group's queries and its concatenated key spans. The
  group's query rows and key/value spans are copied (``torch.cat`` of slices) into compact tensors; no
  ``atten_mask`` is needed because every query of a group attends every key it is given. Shared layouts
  pass all heads at once (GQA through ``head_num`` and the K/V head count, ``N_q % N_kv == 0``); per-head
  layouts run one head per call with its own KV head.
* ``block_sparse`` - `npu_block_sparse_attention` with ``BNSD`` tensors and the layout's exact tile mask
  (`tile_grid`, 1 = compute), where its constraints hold: key tiles a multiple of 128 tokens, fp16/bf16
  (bf16 with ``inner_precise=0``), head dim 64 or 128.

lse is taken from ``softmax_max + log(softmax_sum)`` (fusion) or ``softmax_lse`` (block-sparse), natural
log. Verified against a CPU stand-in of torch_npu (tests/npu_standin.py), not on Ascend hardware.
"""
from __future__ import annotations

import copy
import dataclasses
from types import ModuleType
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from ..backends.base import Backend, BackendUnavailable, Capabilities, register
from ..choice import problem_key, timed_choice
from ..reference.layout import BlockSparseLayout, LayoutMemo
from .detect import cpu_standin_active, load_torch_npu
from .groups import TileGrid, span_groups, tile_grid

__all__ = ["NpuBackend", "run_fusion", "run_block_sparse", "block_sparse_reason"]

_FUSION_MAX_HEADS = 256
_FUSION_MAX_HEAD_DIM = 768
_NO_BAND = 2147483647                          # pre/next tokens: no band limit
_BLOCK_SPARSE_DTYPES = (torch.float16, torch.bfloat16)
_BLOCK_SPARSE_HEAD_DIMS = (64, 128)
_MASKS = LayoutMemo()   # per layout: the device tile mask of each (device, batch, heads)


def _gather(x: Tensor, ranges, heads: slice) -> Tensor:
    """Copy of ``x[:, ranges, heads]`` (``x`` ``[B, S, H, D]``) with the ranges concatenated along S."""
    return torch.cat([x[:, a:b, heads] for a, b in ranges], dim=1)


def run_fusion(torch_npu: ModuleType, q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout,
               scale: float) -> Tuple[Tensor, Tensor]:
    """One ``npu_fusion_attention`` call per `SpanGroup`; returns ``(out [B, Sq, H, D], lse [B, H, Sq])``.

    Copies each group's queries and key/value spans (see the module docstring)."""
    B, Sq, H, D = q.shape
    group_size = H // k.shape[2]
    out = torch.zeros_like(q)
    lse = torch.full((B, H, Sq), float("-inf"), dtype=torch.float32, device=q.device)
    for g in span_groups(layout):
        if g.head is None:
            qh, kvh = slice(None), slice(None)
        else:
            qh, kvh = slice(g.head, g.head + 1), slice(g.head // group_size, g.head // group_size + 1)
        qg = _gather(q, g.q_ranges, qh)
        res = torch_npu.npu_fusion_attention(
            qg, _gather(k, g.kv_spans, kvh), _gather(v, g.kv_spans, kvh), qg.shape[2], "BSND",
            atten_mask=None, scale=scale, keep_prob=1.0, pre_tockens=_NO_BAND, next_tockens=_NO_BAND,
            inner_precise=0, sparse_mode=0)
        o, s_max, s_sum = res[0], res[1], res[2]             # [B, n, Hg, D], [B, Hg, n, 8] x2
        lg = s_max[..., 0].float() + torch.log(s_sum[..., 0].float())
        pos = 0
        for a, b in g.q_ranges:
            out[:, a:b, qh] = o[:, pos:pos + b - a]
            lse[:, qh, a:b] = lg[:, :, pos:pos + b - a]
            pos += b - a
    return out, lse


def block_sparse_reason(q: Tensor, layout: BlockSparseLayout) -> Optional[str]:
    """Why ``npu_block_sparse_attention`` cannot run these inputs exactly, or None."""
    if q.dtype not in _BLOCK_SPARSE_DTYPES:
        return f"npu_block_sparse_attention needs fp16/bf16, got {q.dtype}"
    if q.shape[-1] not in _BLOCK_SPARSE_HEAD_DIMS:
        return f"npu_block_sparse_attention needs head dim 64 or 128, got {q.shape[-1]}"
    grid = tile_grid(layout)
    return grid if isinstance(grid, str) else None


def _device_mask(grid: TileGrid, B: int, H: int, device: torch.device) -> Tensor:
    return grid.mask.to(torch.int8).expand(B, H, -1, -1).contiguous().to(device)


def run_block_sparse(torch_npu: ModuleType, q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout,
                     scale: float, return_lse: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """One ``npu_block_sparse_attention`` call on BNSD copies of q/k/v with the layout's exact tile mask."""
    B, Sq, H, D = q.shape
    grid = tile_grid(layout)
    if isinstance(grid, str):
        raise ValueError(f"npu_block_sparse_attention cannot run this layout: {grid}")
    mask = _MASKS.get(layout, (str(q.device), B, H), lambda: _device_mask(grid, B, H, q.device))
    bnsd = [x.transpose(1, 2).contiguous() for x in (q, k, v)]
    o, lse = torch_npu.npu_block_sparse_attention(
        *bnsd, mask, [grid.x, grid.y], q_input_layout="BNSD", kv_input_layout="BNSD",
        num_key_value_heads=k.shape[2], scale_value=scale,
        inner_precise=0 if q.dtype == torch.bfloat16 else 1, softmax_lse_flag=int(return_lse))
    out = o.transpose(1, 2)
    return out, (lse.reshape(B, H, Sq).float() if return_lse else None)


def _zero_rows_without_keys(out: Tensor, lse: Optional[Tensor], layout: BlockSparseLayout) -> None:
    """Rows whose query block attends no keys: output 0 and lse -inf (whatever the op wrote there)."""
    empty = layout.keys_per_block() == 0                    # [Hl, nQB]
    if not bool(empty.any()):
        return
    q_off = layout.q_offsets.expand(layout.num_heads, -1)
    rows = torch.gather(empty, 1, BlockSparseLayout.token_to_block(q_off)).to(out.device)   # [Hl, Sq]
    out.masked_fill_(rows.transpose(0, 1)[None, :, :, None], 0)
    if lse is not None:
        lse.masked_fill_(rows[None], float("-inf"))


class NpuBackend(Backend):
    name = "npu"
    notes = "verified against a CPU stand-in of torch_npu only, not on Ascend hardware"
    caps = Capabilities(devices=frozenset({"npu"}), dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
                        head_dims=None)
    _STANDIN_CAPS = dataclasses.replace(caps, devices=frozenset({"npu", "cpu"}))

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        _, reason = load_torch_npu()
        return reason

    def unsupported_reason(self, q: Tensor, k: Tensor, layout: BlockSparseLayout, return_lse: bool) -> Optional[str]:
        checked: Backend = self
        if q.device.type == "cpu" and cpu_standin_active():   # test hook only: see npu.detect.CPU_STANDIN_ATTR
            checked = copy.copy(self)
            checked.caps = self._STANDIN_CAPS
        reason = Backend.unsupported_reason(checked, q, k, layout, return_lse)
        if reason:
            return reason
        if q.shape[2] > _FUSION_MAX_HEADS:
            return f"npu_fusion_attention supports at most {_FUSION_MAX_HEADS} heads, got {q.shape[2]}"
        if q.shape[-1] > _FUSION_MAX_HEAD_DIM:
            return f"npu_fusion_attention supports head dims up to {_FUSION_MAX_HEAD_DIM}, got {q.shape[-1]}"
        return None

    def variants(self, torch_npu: ModuleType, q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout,
                 scale: float, return_lse: bool) -> Dict[str, Callable[[], Tuple[Tensor, Optional[Tensor]]]]:
        """The ways to run these inputs, preferred first: ``block_sparse`` (when exact) and ``fusion``."""
        options: Dict[str, Callable[[], Tuple[Tensor, Optional[Tensor]]]] = {}
        if block_sparse_reason(q, layout) is None:
            options["block_sparse"] = lambda: run_block_sparse(torch_npu, q, k, v, layout, scale, return_lse)
        options["fusion"] = lambda: run_fusion(torch_npu, q, k, v, layout, scale)
        return options

    def run(self, q, k, v, layout, scale, return_lse):
        torch_npu, reason = load_torch_npu()
        if torch_npu is None:
            raise BackendUnavailable(f"backend 'npu': {reason}")
        options = self.variants(torch_npu, q, k, v, layout, scale, return_lse)
        choice = timed_choice("npu-op|" + problem_key(q, k, layout, return_lse), options, q.device)
        out, lse = options[choice]()
        _zero_rows_without_keys(out, lse, layout)
        return out, (lse if return_lse else None)


register(NpuBackend())
