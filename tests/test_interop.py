"""`lvsa_kernels.interop`: FlexAttention on `to_flex_block_mask` gives our output; the FlashInfer BSR dict describes
the layout (FlashInfer itself needs a GPU; its structure is checked here and in test_layout.py)."""
import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

from lvsa_kernels import BlockSparseLayout, LVSAPattern, reference_attention
from lvsa_kernels.interop import to_flashinfer_bsr, to_flex_block_mask
from random_inputs import random_qkv

pytestmark = [pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
              pytest.mark.filterwarnings("ignore:return_lse is deprecated")]


def _flex(q, k, v, block_mask, fn=flex_attention):
    out, aux = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                  enable_gqa=k.shape[2] != q.shape[2], return_lse=True)
    return out.transpose(1, 2), aux


def _layouts():
    # rows without keys (query block 1), lengths that are no multiple of the flex tile, an empty key block
    no_keys = BlockSparseLayout.from_block_mask(torch.tensor([[True, False, True], [False, False, False],
                                                              [True, True, False]]), [5, 6, 9], [7, 0, 12])
    per_head = BlockSparseLayout.from_block_mask(
        torch.tensor([[[True, False], [True, True]], [[False, True], [False, False]]]), [[6, 14], [11, 9]], [13, 6])
    lvsa = LVSAPattern(window=1, reference_frames=3).plan(5, 4, step=1, text_tokens=3)
    return {"rows_without_keys": no_keys, "per_head_offsets": per_head, "lvsa_text": lvsa}


@pytest.mark.parametrize("name", list(_layouts()))
@pytest.mark.parametrize("block_size", [4, 8])
def test_flex_output_equals_reference(name, block_size):
    """Eager flex_attention applies only the mask_mod: the whole token mask must be in it."""
    layout = _layouts()[name]
    heads = 2 if layout.num_heads == 2 else 4
    q, k, v = random_qkv(2, layout.q_len, layout.kv_len, heads, 2, 16, 3, torch.float32)
    ref, ref_lse = reference_attention(q, k, v, layout, return_lse=True)
    out, lse = _flex(q, k, v, to_flex_block_mask(layout, block_size))
    assert torch.allclose(out, ref, atol=1e-5)
    keys = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), keys) and torch.allclose(lse[keys], ref_lse[keys], atol=1e-5)
    assert (out.transpose(1, 2)[~keys] == 0).all()


def test_compiled_flex_reads_the_block_lists():
    """Compiled flex_attention skips the tiles the block lists leave out (CPU inductor: inference, no lse)."""
    layout = _layouts()["per_head_offsets"]
    q, k, v = random_qkv(1, layout.q_len, layout.kv_len, 2, 1, 16, 4, torch.float32)
    fn = torch.compile(flex_attention, dynamic=False)
    with torch.no_grad():
        out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=to_flex_block_mask(layout, 8),
                 enable_gqa=True).transpose(1, 2)
    assert torch.allclose(out, reference_attention(q, k, v, layout), atol=1e-5)


def test_flex_block_mask_rejects_bad_block_size():
    with pytest.raises(ValueError, match="block_size: expected an int >= 1, got 0"):
        to_flex_block_mask(_layouts()["lvsa_text"], 0)
    with pytest.raises(TypeError, match="layout: expected a BlockSparseLayout"):
        to_flex_block_mask(torch.ones(2, 2, dtype=torch.bool))


def test_flashinfer_bsr_of_an_lvsa_video_layout():
    """Frames of equal size: BSR blocks are frames, and the block lists are the layout's rows."""
    layout = LVSAPattern(window=1, reference_frames=3).plan(6, 8, step=0)
    bsr = to_flashinfer_bsr(layout)
    assert set(bsr) == {"indptr", "indices", "M", "N", "R", "C"}
    assert (bsr["M"], bsr["N"], bsr["R"], bsr["C"]) == (48, 48, 8, 8)
    assert bsr["indptr"].dtype == bsr["indices"].dtype == torch.int32
    mask = torch.zeros(6, 6, dtype=torch.bool)
    for r in range(6):
        mask[r, bsr["indices"][bsr["indptr"][r]:bsr["indptr"][r + 1]].long()] = True
    assert torch.equal(mask, layout.to_block_mask()[0])


def test_flashinfer_bsr_rejects_text_blocks():
    with pytest.raises(ValueError, match="uniform"):
        to_flashinfer_bsr(_layouts()["lvsa_text"])
