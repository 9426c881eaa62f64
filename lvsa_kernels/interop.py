"""Hand a `BlockSparseLayout` to other libraries: FlexAttention's ``BlockMask`` and FlashInfer's BSR arguments.

Both converters read only the layout (O(S + nnz) work, nothing O(S^2)) and import neither library at module
import time::

    from lvsa_kernels.interop import to_flex_block_mask, to_flashinfer_bsr
    out = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                         block_mask=to_flex_block_mask(layout, device=q.device)).transpose(1, 2)
    wrapper.plan(**to_flashinfer_bsr(layout), num_qo_heads=H, num_kv_heads=H_kv, head_dim=D)
"""
from __future__ import annotations

from typing import Any, Dict, Tuple, Union

import torch
from torch import Tensor

from .reference.layout import BlockSparseLayout

__all__ = ["to_flashinfer_bsr", "to_flex_block_mask"]


def to_flex_block_mask(layout: BlockSparseLayout, block_size: int = 128,
                       device: Union[str, torch.device, None] = None):
    """A ``torch.nn.attention.flex_attention.BlockMask`` with the layout's token-level mask.

    Args:
        layout: shared (1 head: the mask broadcasts over heads) or per-head layout; any block sizes.
        block_size: FlexAttention's tile, in tokens (both sides); lengths need not be multiples of it.
        device: where the mask's tensors live (default CPU); use q's device.

    Tiles wholly inside selected block pairs are "full"; tiles that straddle a block boundary and touch a
    selected pair are "partial" and use a ``mask_mod`` that looks the pair up through O(S) token->block tables.
    The ``mask_mod`` encodes the whole mask, so eager ``flex_attention`` (which applies only ``mask_mod``) and
    compiled ``flex_attention`` (which also skips the tiles the mask leaves out) give the same output. Rows
    without keys give 0 (lse -inf), as `block_sparse_attn` does.
    """
    from torch.nn.attention.flex_attention import BlockMask

    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size: expected an int >= 1, got {block_size!r}")
    if not isinstance(layout, BlockSparseLayout):
        raise TypeError(f"layout: expected a BlockSparseLayout, got {type(layout).__name__}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    H, bs = layout.num_heads, block_size
    n_qt = -(-layout.q_len // bs)
    n_kt = -(-layout.kv_len // bs)

    def overlap(offsets: Tensor, n_tiles: int, length: int) -> Tensor:
        # [H, n_tiles, n_blocks] float: tile t overlaps (non-empty) block b
        lo = offsets[:, :-1].long()[:, None, :]
        hi = offsets[:, 1:].long()[:, None, :]
        t0 = (torch.arange(n_tiles) * bs)[None, :, None]
        t1 = torch.clamp(t0 + bs, max=length)
        return ((lo < t1) & (hi > t0) & (hi > lo)).float()

    oq = overlap(layout.q_offsets.expand(H, -1), n_qt, layout.q_len)
    ok = overlap(layout.kv_offsets.expand(H, -1), n_kt, layout.kv_len)
    bm = layout.to_block_mask().float()
    touched = oq @ torch.ones_like(bm) @ ok.transpose(1, 2)
    selected = oq @ bm @ ok.transpose(1, 2)
    any_sel = selected > 0
    full = any_sel & (selected == touched)
    partial = any_sel & ~full

    def pack(m: Tensor) -> Tuple[Tensor, Tensor]:
        num = m.sum(-1).to(torch.int32)
        idx = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num[None].to(dev), idx[None].to(dev)

    p_num, p_idx = pack(partial)
    f_num, f_idx = pack(full)
    qb = layout.token_to_block(layout.q_offsets.expand(H, -1)).to(dev)
    kb = layout.token_to_block(layout.kv_offsets.expand(H, -1)).to(dev)
    allowed = layout.to_block_mask().to(dev)
    shared = H == 1

    def mask_mod(b, h, q_idx, kv_idx):
        hh = 0 if shared else h
        return allowed[hh, qb[hh, q_idx], kb[hh, kv_idx]]

    return BlockMask.from_kv_blocks(p_num, p_idx, f_num, f_idx, BLOCK_SIZE=bs, mask_mod=mask_mod,
                                    seq_lengths=(layout.q_len, layout.kv_len))


def to_flashinfer_bsr(layout: BlockSparseLayout) -> Dict[str, Any]:
    """Arguments for ``flashinfer.BlockSparseAttentionWrapper.plan``: ``dict(indptr, indices, M, N, R, C)``.

    ``indptr [M / R + 1]`` and ``indices [nnz]`` are int32 CPU tensors (FlashInfer's prebuilt modules take int32);
    ``M``, ``N`` are the query and key lengths in tokens, ``R``, ``C`` the block sizes. Needs a layout shared by all
    heads with equal query blocks of R tokens (the last may be shorter) and equal key blocks of C tokens; raises
    ValueError otherwise (FlashInfer's ``VariableBlockSparseAttentionWrapper`` takes variable blocks).
    """
    if not isinstance(layout, BlockSparseLayout):
        raise TypeError(f"layout: expected a BlockSparseLayout, got {type(layout).__name__}")
    if layout.num_heads != 1:
        raise ValueError(f"layout: BSR is shared by all heads; this layout is per head ({layout.num_heads} heads)")
    qs, ks = layout.block_sizes()
    qs, ks = qs[0], ks[0]
    R, C = int(qs[0]), int(ks[0])
    if R <= 0 or C <= 0 or (qs[:-1] != R).any() or int(qs[-1]) > R or int(qs[-1]) <= 0 or (ks != C).any():
        raise ValueError(
            "layout: BSR needs uniform query blocks (the last may be shorter) and uniform key blocks; "
            f"got query sizes {sorted(set(qs.tolist()))}, key sizes {sorted(set(ks.tolist()))}"
        )
    return {"indptr": layout.row_ptr[0].clone(), "indices": layout.col_idx.clone(),
            "M": layout.q_len, "N": layout.kv_len, "R": R, "C": C}
