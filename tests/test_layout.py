"""BlockSparseLayout invariants (hypothesis), validation errors and the interop conversions' structure (FlashInfer BSR,
FlexAttention BlockMask; their outputs: test_interop.py)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lvsa_kernels import BlockSparseLayout, LayoutError, LVSAPattern
from lvsa_kernels.interop import to_flashinfer_bsr, to_flex_block_mask


# ---------------------------------------------------------------- strategies and brute-force helpers
@st.composite
def block_sizes(draw, n, heads):
    """[n] or [heads, n] block sizes (zeros allowed); every head covers the same token count."""
    total = draw(st.integers(0, 3 * n))
    rows = []
    for _ in range(heads):
        cuts = sorted(draw(st.lists(st.integers(0, total), min_size=n - 1, max_size=n - 1)))
        edges = [0] + cuts + [total]
        rows.append([b - a for a, b in zip(edges[:-1], edges[1:])])
    return rows[0] if heads == 1 else rows


@st.composite
def layout_inputs(draw):
    """(mask [nQB, nKB] or [H, nQB, nKB], q sizes, kv sizes)."""
    heads = draw(st.sampled_from([0, 1, 2, 3]))  # 0: a 2-D mask shared by all heads
    nqb, nkb = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    h = max(heads, 1)
    bits = draw(st.lists(st.booleans(), min_size=h * nqb * nkb, max_size=h * nqb * nkb))
    mask = torch.tensor(bits, dtype=torch.bool).view(h, nqb, nkb)
    if heads == 0:
        mask = mask[0]
    per_head = heads > 1 and draw(st.booleans())
    qs = draw(block_sizes(nqb, h if per_head else 1))
    ks = draw(block_sizes(nkb, h if per_head else 1))
    return mask, qs, ks


def offsets(sizes, heads):
    t = torch.as_tensor(sizes, dtype=torch.int64)
    t = t.expand(heads, -1) if t.dim() == 1 else t
    return torch.cat([torch.zeros(heads, 1, dtype=torch.int64), t.cumsum(1)], dim=1)


def brute_token_mask(mask, qs, ks):
    """bool [H, Sq, Skv] from the block mask by explicit loops over blocks."""
    m = mask if mask.dim() == 3 else mask[None]
    H = m.shape[0]
    qo, ko = offsets(qs, H), offsets(ks, H)
    out = torch.zeros(H, int(qo[0, -1]), int(ko[0, -1]), dtype=torch.bool)
    for h in range(H):
        for r in range(m.shape[1]):
            for c in range(m.shape[2]):
                if m[h, r, c]:
                    out[h, qo[h, r]:qo[h, r + 1], ko[h, c]:ko[h, c + 1]] = True
    return out


def row_spans(layout, h, r):
    sp = layout.spans
    a, b = int(sp.ptr[h, r]), int(sp.ptr[h, r + 1])
    return list(zip(sp.start[a:b].tolist(), sp.end[a:b].tolist()))


# ---------------------------------------------------------------- invariants
@settings(max_examples=120, deadline=None)
@given(layout_inputs())
def test_round_trip_spans_density(inputs):
    mask, qs, ks = inputs
    layout = BlockSparseLayout.from_block_mask(mask, qs, ks)
    m3 = mask if mask.dim() == 3 else mask[None]
    H = m3.shape[0]
    assert torch.equal(layout.to_block_mask(), m3)
    tm = layout.to_token_mask()
    assert torch.equal(tm, brute_token_mask(mask, qs, ks))
    qo, ko = offsets(qs, H), offsets(ks, H)
    for h in range(H):
        for r in range(m3.shape[1]):
            spans = row_spans(layout, h, r)
            covered = [t for s, e in spans for t in range(s, e)]
            expected = [t for c in range(m3.shape[2]) if m3[h, r, c] for t in range(ko[h, c], ko[h, c + 1])]
            assert covered == expected  # sorted, no overlap, exactly the selected key tokens
            row = torch.zeros(tm.shape[2], dtype=torch.bool)
            row[expected] = True
            assert torch.equal(tm[h, qo[h, r]:qo[h, r + 1]], row.expand(int(qo[h, r + 1] - qo[h, r]), -1))
            assert all(s < e for s, e in spans)
            assert all(e0 < s1 for (_, e0), (s1, _) in zip(spans[:-1], spans[1:])), f"touching spans {spans}"
    if tm.numel():
        assert layout.density == pytest.approx(tm.double().mean().item(), abs=1e-12)
        assert layout.is_dense == bool(tm.all())


def test_spans_merge_across_an_unselected_empty_block():
    # key block 1 has no tokens, so blocks 0 and 2 are adjacent in token space: one span [0, 9)
    mask = torch.tensor([[True, False, True, True]])
    layout = BlockSparseLayout.from_block_mask(mask, [3], [4, 0, 3, 2])
    assert row_spans(layout, 0, 0) == [(0, 9)]


def test_dense_layout():
    layout = BlockSparseLayout.dense(7, 5)
    assert layout.is_dense and layout.density == 1.0
    assert layout.to_token_mask().shape == (1, 7, 5)


# ---------------------------------------------------------------- validate()
def _arrays(**over):
    a = {
        "q_offsets": torch.tensor([[0, 2, 4]]),
        "kv_offsets": torch.tensor([[0, 3, 6, 9]]),
        "row_ptr": torch.tensor([[0, 2, 3]]),
        "col_idx": torch.tensor([0, 2, 1]),
    }
    a.update(over)
    return {k: v.to(torch.int32) if v.dtype == torch.int64 and k not in over else v for k, v in a.items()}


def _i32(x):
    return torch.tensor(x, dtype=torch.int32)


def test_validate_accepts_valid_arrays():
    layout = BlockSparseLayout(**_arrays()).validate()
    assert layout.to_block_mask()[0].tolist() == [[True, False, True], [False, True, False]]


@pytest.mark.parametrize("over,match", [
    ({"col_idx": _i32([2, 0, 1])}, "strictly increasing"),
    ({"col_idx": _i32([1, 1, 1])}, "strictly increasing"),
    ({"col_idx": _i32([0, 3, 1])}, r"col_idx: indices must lie in \[0, 3\)"),
    ({"col_idx": _i32([-1, 2, 1])}, "col_idx: indices must lie in"),
    ({"q_offsets": _i32([[0, 4, 2]])}, "q_offsets: offsets must be non-decreasing"),
    ({"kv_offsets": _i32([[0, 3, 2, 9]])}, "kv_offsets: offsets must be non-decreasing"),
    ({"q_offsets": _i32([[1, 2, 4]])}, "q_offsets: offsets must start at 0"),
    ({"row_ptr": _i32([[0, 2, 3, 3]])}, "row_ptr has 3 rows but q_offsets has 2 blocks"),
    ({"row_ptr": _i32([[0, 2, 2]])}, "row_ptr ends at 2 but col_idx has 3 entries"),
    ({"row_ptr": _i32([[0, 3, 2]])}, "row_ptr: must be non-decreasing"),
    ({"col_idx": torch.tensor([0, 2, 1])}, "col_idx: expected an int32 tensor"),
    ({"q_offsets": torch.tensor([[0.0, 2.0, 4.0]])}, "q_offsets: expected an int32 tensor"),
])
def test_validate_rejects(over, match):
    with pytest.raises(LayoutError, match=match):
        BlockSparseLayout(**_arrays(**over)).validate()


def test_from_block_mask_rejects_bad_arguments():
    with pytest.raises(LayoutError, match="mask: expected dtype torch.bool"):
        BlockSparseLayout.from_block_mask(torch.ones(2, 2), [1, 1], [1, 1])
    with pytest.raises(LayoutError, match="does not match"):
        BlockSparseLayout.from_block_mask(torch.ones(2, 2, dtype=torch.bool), [1, 1, 1], [1, 1])
    with pytest.raises(LayoutError, match="q_block_sizes: block sizes must be >= 0"):
        BlockSparseLayout.from_block_mask(torch.ones(2, 2, dtype=torch.bool), [1, -1], [1, 1])
    with pytest.raises(LayoutError, match="q_block_sizes: expected at least one block, got no block sizes"):
        BlockSparseLayout.from_block_mask(torch.zeros(0, 0, dtype=torch.bool), [], [])
    with pytest.raises(LayoutError, match="kv_block_sizes: expected at least one block"):
        BlockSparseLayout.from_block_mask(torch.zeros(1, 0, dtype=torch.bool), [4], torch.zeros(0, dtype=torch.int32))


# ---------------------------------------------------------------- FlashInfer BSR
def test_flashinfer_bsr_uniform():
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(5, 4, generator=gen) < 0.5
    layout = BlockSparseLayout.from_block_mask(mask, [3, 3, 3, 3, 2], [4] * 4)
    bsr = to_flashinfer_bsr(layout)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), mask.sum(1).cumsum(0)])
    assert bsr["indptr"].dtype == bsr["indices"].dtype == torch.int32
    assert bsr["indptr"].tolist() == indptr.tolist()
    assert bsr["indices"].tolist() == mask.nonzero()[:, 1].tolist()
    assert (bsr["M"], bsr["N"], bsr["R"], bsr["C"]) == (14, 16, 3, 4)


@pytest.mark.parametrize("mask,qs,ks,match", [
    (torch.ones(2, 2, dtype=torch.bool), [3, 3], [4, 3], "uniform"),
    (torch.ones(2, 2, dtype=torch.bool), [3, 5], [4, 4], "uniform"),
    (torch.ones(2, 2, dtype=torch.bool), [0, 3], [4, 4], "uniform"),
    (torch.ones(2, 2, 2, dtype=torch.bool), [3, 3], [4, 4], "per head"),
])
def test_flashinfer_bsr_rejects(mask, qs, ks, match):
    with pytest.raises(ValueError, match=match):
        to_flashinfer_bsr(BlockSparseLayout.from_block_mask(mask, qs, ks))


# ---------------------------------------------------------------- FlexAttention BlockMask
def _check_flex(layout, bs):
    tm = layout.to_token_mask()
    bm = to_flex_block_mask(layout, block_size=bs)
    H, sq, skv = tm.shape
    n_qt, n_kt = -(-sq // bs), -(-skv // bs)
    dense = bm.to_dense()
    assert dense.shape[-2:] == (n_qt, n_kt)
    for h in range(H):
        for i in range(n_qt):
            full = {j for j in range(n_kt) if tm[h, i * bs:(i + 1) * bs, j * bs:(j + 1) * bs].all()}
            anyj = {j for j in range(n_kt) if tm[h, i * bs:(i + 1) * bs, j * bs:(j + 1) * bs].any()}
            n = int(bm.kv_num_blocks[0, h, i])
            nf = int(bm.full_kv_num_blocks[0, h, i])
            assert set(bm.kv_indices[0, h, i, :n].tolist()) == anyj - full and n == len(anyj - full)
            assert set(bm.full_kv_indices[0, h, i, :nf].tolist()) == full and nf == len(full)
            assert dense[0, h, i].bool().tolist() == [j in anyj for j in range(n_kt)]
        got = bm.mask_mod(torch.tensor(0), torch.tensor(h), torch.arange(sq)[:, None], torch.arange(skv)[None, :])
        assert torch.equal(got, tm[h])


def test_flex_block_mask_lvsa_with_text():
    layout = LVSAPattern(window=1, reference_frames=3).plan(8, 5, step=1, text_tokens=3)
    _check_flex(layout, 4)


@settings(max_examples=30, deadline=None)
@given(layout_inputs(), st.sampled_from([1, 2, 3, 4]))
def test_flex_block_mask_random(inputs, bs):
    mask, qs, ks = inputs
    layout = BlockSparseLayout.from_block_mask(mask, qs, ks)
    if layout.q_len and layout.kv_len:
        _check_flex(layout, bs)


# ---------------------------------------------------------------- display
def test_describe_lvsa_plan_with_text():
    layout = LVSAPattern(window=1, reference_frames=3).plan(9, 2, text_tokens=3)
    text = layout.describe()
    rows = [line.split()[1] for line in text.splitlines()[text.splitlines().index(
        next(line for line in text.splitlines() if "block map" in line)) + 1:]]
    assert len(rows) == 10 and all(len(r) == 10 for r in rows)
    joined = "".join(rows)
    assert {"G", "W", "T", "."} <= set(joined)
    assert rows[-1] == "T" * 10  # text queries attend everything
    assert all(r[-1] == "T" for r in rows)  # every query attends the text keys
    assert "density=" in repr(layout)


@pytest.mark.parametrize("position, block", [("after", 8), ("before", 0)])
def test_lvsa_text_block_is_typed_and_validated(position, block):
    from lvsa_kernels.reference.layout import TextBlock

    layout = LVSAPattern(window=1, reference_frames=3).plan(8, 5, step=1, text_tokens=3, text_position=position)
    assert layout.text == TextBlock(block, block) and "text_q_blocks" not in layout.meta
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(LayoutError, match="text"):
        BlockSparseLayout.from_block_mask(mask, [2, 2], [1, 1, 1], text=TextBlock(2, 0))


def test_layout_memo_is_keyed_by_identity_weak_and_bounded():
    import gc

    from lvsa_kernels.reference.layout import LayoutMemo

    memo = LayoutMemo(max_layouts=2)
    a, b, c = (BlockSparseLayout.dense(n) for n in (4, 5, 6))
    built = []
    assert memo.get(a, "k", lambda: built.append("a") or 1) == 1
    assert memo.get(a, "k", lambda: built.append("again") or 2) == 1 and built == ["a"]
    assert memo.peek(BlockSparseLayout.dense(4), "k") is None                  # an equal layout is another layout
    memo.get(b, "k", lambda: 2)
    memo.get(a, "k", lambda: 0)                                                # a is now the most recent
    memo.get(c, "k", lambda: 3)                                                # evicts b, the least recent
    assert memo.peek(b, "k") is None and memo.peek(a, "k") == 1 and len(memo) == 2
    del c
    gc.collect()
    assert len(memo) == 1


def test_running_a_backend_leaves_the_layout_unchanged():
    from lvsa_kernels import block_sparse_attn

    layout = LVSAPattern(window=1, reference_frames=3).plan(6, 4, step=1, text_tokens=2)
    before = set(layout._derived)
    q = torch.randn(1, layout.q_len, 2, 16, device="cuda" if torch.cuda.is_available() else "cpu")
    block_sparse_attn(q, q, q, layout, backend="triton")                     # tunes, schedules: kept by the backend
    assert set(layout._derived) <= before | {"spans", "entry_rows"}
    assert not hasattr(layout, "cached") and not hasattr(layout, "to_flashinfer_bsr")
