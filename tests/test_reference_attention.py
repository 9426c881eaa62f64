"""reference_attention vs torch SDPA with an explicit boolean token mask (fp32 / fp64, fresh seeds)."""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from lvsa_kernels import BlockSparseLayout, LVSAPattern, reference_attention

attention_module = importlib.import_module("lvsa_kernels.reference.attention")

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def rand_qkv(B, Sq, Skv, H, Hkv, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Sq, H, D, generator=g, dtype=dtype)
    k = torch.randn(B, Skv, Hkv, D, generator=g, dtype=dtype)
    v = torch.randn(B, Skv, Hkv, D, generator=g, dtype=dtype)
    return q, k, v


def sdpa_masked(q, k, v, layout, scale=None):
    """SDPA with the layout's boolean token mask; rows with no keys are set to 0 (SDPA gives NaN there)."""
    H, Hkv = q.shape[2], k.shape[2]
    kk = k.repeat_interleave(H // Hkv, dim=2).transpose(1, 2)
    vv = v.repeat_interleave(H // Hkv, dim=2).transpose(1, 2)
    tm = layout.to_token_mask()[None]  # [1, Hl, Sq, Skv]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), kk, vv, attn_mask=tm, scale=scale)
    out = out.transpose(1, 2)
    empty = ~tm.any(-1)  # [1, Hl, Sq]
    return torch.where(empty.transpose(1, 2)[..., None], torch.zeros((), dtype=out.dtype), out)


def masked_lse(q, k, layout, scale):
    H, Hkv = q.shape[2], k.shape[2]
    kk = k.repeat_interleave(H // Hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), kk.double()) * scale
    s = s.masked_fill(~layout.to_token_mask()[None], float("-inf"))
    return torch.logsumexp(s, dim=-1).float()


def random_layout(seed, nqb=4, nkb=5, heads=0, per_head_sizes=False, density=0.6):
    g = torch.Generator().manual_seed(seed)
    h = max(heads, 1)
    mask = torch.rand(h, nqb, nkb, generator=g) < density
    mask[..., 0, 0] = True
    if heads == 0:
        mask = mask[0]
    if per_head_sizes:
        qs = [torch.randperm(nqb, generator=g).add(1).tolist() for _ in range(h)]
        ks = [torch.randperm(nkb, generator=g).add(2).tolist() for _ in range(h)]
    else:
        qs = torch.randint(1, 6, (nqb,), generator=g).tolist()
        ks = torch.randint(1, 6, (nkb,), generator=g).tolist()
    return BlockSparseLayout.from_block_mask(mask, qs, ks)


def check(q, k, v, layout, scale=None):
    out, lse = reference_attention(q, k, v, layout, scale=scale, return_lse=True)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    torch.testing.assert_close(out, sdpa_masked(q, k, v, layout, scale), **TOL[q.dtype])
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    torch.testing.assert_close(lse, masked_lse(q, k, layout, s), rtol=1e-5, atol=1e-5)
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shared_layout(dtype, seed):
    layout = random_layout(seed)
    q, k, v = rand_qkv(1, layout.q_len, layout.kv_len, 2, 2, 16, dtype, seed + 100)
    check(q, k, v, layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_head_sizes", [False, True])
def test_per_head_layout(dtype, per_head_sizes):
    layout = random_layout(7, heads=3, per_head_sizes=per_head_sizes)
    assert layout.num_heads == 3
    q, k, v = rand_qkv(1, layout.q_len, layout.kv_len, 3, 3, 8, dtype, 11)
    check(q, k, v, layout)


@pytest.mark.parametrize("H,Hkv", [(4, 2), (4, 1), (6, 3)])
def test_gqa_batch2(H, Hkv):
    layout = random_layout(3)
    q, k, v = rand_qkv(2, layout.q_len, layout.kv_len, H, Hkv, 16, torch.float32, 5)
    check(q, k, v, layout)


def test_gqa_per_head_layout():
    layout = random_layout(4, heads=4, per_head_sizes=True)
    q, k, v = rand_qkv(2, layout.q_len, layout.kv_len, 4, 2, 8, torch.float64, 6)
    check(q, k, v, layout)


@pytest.mark.parametrize("position", ["before", "after"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lvsa_with_text(position, dtype):
    layout = LVSAPattern(window=1, reference_frames=3).plan(10, 4, step=2, text_tokens=5, text_position=position)
    assert layout.density < 1
    q, k, v = rand_qkv(2, layout.q_len, layout.kv_len, 2, 1, 16, dtype, 21)
    check(q, k, v, layout)


def test_empty_rows_give_zero_and_minus_inf():
    mask = torch.tensor([[True, False, True], [False, False, False], [False, True, False]])
    layout = BlockSparseLayout.from_block_mask(mask, [3, 4, 2], [2, 3, 4])
    q, k, v = rand_qkv(2, 9, 9, 2, 2, 8, torch.float32, 31)
    out, lse = check(q, k, v, layout)
    assert torch.equal(out[:, 3:7], torch.zeros_like(out[:, 3:7]))
    assert torch.isneginf(lse[:, :, 3:7]).all()
    assert torch.isfinite(lse[:, :, :3]).all() and torch.isfinite(lse[:, :, 7:]).all()


def test_empty_rows_per_head():
    mask = torch.ones(2, 2, 2, dtype=torch.bool)
    mask[1, 0] = False  # head 1, query block 0 attends nothing
    layout = BlockSparseLayout.from_block_mask(mask, [3, 3], [4, 2])
    q, k, v = rand_qkv(1, 6, 6, 2, 2, 8, torch.float64, 32)
    out, lse = check(q, k, v, layout)
    assert torch.equal(out[:, :3, 1], torch.zeros_like(out[:, :3, 1]))
    assert torch.isneginf(lse[:, 1, :3]).all() and torch.isfinite(lse[:, 0]).all()


@pytest.mark.parametrize("scale", [0.05, 0.9])
def test_custom_scale(scale):
    layout = random_layout(9)
    q, k, v = rand_qkv(1, layout.q_len, layout.kv_len, 2, 2, 16, torch.float64, 41)
    out = check(q, k, v, layout, scale=scale)[0]
    assert not torch.allclose(out, reference_attention(q, k, v, layout))


def test_non_contiguous_inputs():
    layout = random_layout(12)
    S, H, D = layout.q_len, 2, 16
    g = torch.Generator().manual_seed(51)
    qkv = torch.randn(2, S, 3, H, D, generator=g)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert not q.is_contiguous()
    check(q, k, v, layout)
    bhsd = torch.randn(3, 2, H, S, D, generator=g)
    qt, kt, vt = (t.transpose(1, 2) for t in bhsd)
    assert not qt.is_contiguous()
    check(qt, kt, vt, layout)


def test_chunked_rows_never_materialise_s_by_s(monkeypatch):
    layout = LVSAPattern(window=1, reference_frames=3).plan(12, 6, text_tokens=4)
    S = layout.q_len
    q, k, v = rand_qkv(2, S, S, 2, 1, 8, torch.float64, 61)
    expected_out, expected_lse = reference_attention(q, k, v, layout, return_lse=True)
    largest = []
    real_matmul = torch.matmul

    def spy(a, b):
        r = real_matmul(a, b)
        largest.append(r.numel())
        return r

    monkeypatch.setattr(attention_module, "_CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(torch, "matmul", spy)
    out, lse = reference_attention(q, k, v, layout, return_lse=True)
    monkeypatch.undo()
    assert max(largest) < S * S
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, sdpa_masked(q, k, v, layout), **TOL[torch.float64])


def test_layout_sequence_mismatch_raises():
    layout = BlockSparseLayout.dense(8)
    q, k, v = rand_qkv(1, 9, 9, 1, 1, 8, torch.float32, 71)
    with pytest.raises(ValueError, match="layout covers"):
        reference_attention(q, k, v, layout)
