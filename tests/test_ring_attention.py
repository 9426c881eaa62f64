"""Layout-aware ring attention (`lvsa_kernels.ring`): plans, the lse merge, and 3 gloo processes vs one process.

The in-process tests replay a ring pass without processes (each rank's parts computed from the plan and merged)
on every layout class; the spawned test runs `ring_attention` on 3 CPU ranks (torch.multiprocessing.spawn, gloo,
a FileStore in the test's tmp dir) and compares every rank's rows with single-process `block_sparse_attn`
(fp32; reference backend, and the Triton interpreter on one case).
"""
from __future__ import annotations

import pytest
import torch

from gloo_ranks import error, run_ranks
from lvsa_kernels import LVSAPattern, block_sparse_attn
from lvsa_kernels.models import get_model
from lvsa_kernels.reference import BlockSparseLayout
from lvsa_kernels.ring import (KeyRuns, SequenceShards, TrafficCounter, merge_partial, rank_plan, ring_attention,
                               ring_plan, sub_layout)

TOL = dict(rtol=1e-5, atol=1e-5)
PATTERN = LVSAPattern(window=1, n_first=1, reference_frames=4, key_frame_interval=3)
T, P = 10, 6
WORLD = 3


def per_head_layout() -> BlockSparseLayout:
    """2 heads with their own block offsets (an empty key block, an empty row in head 0, a row reading only the
    empty block in head 1)."""
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 5, 6, generator=g) < 0.5
    mask[0, 2] = False
    mask[1, 3] = False
    mask[1, 3, 2] = True
    return BlockSparseLayout.from_block_mask(mask, [[12, 9, 17, 10, 12], [5, 20, 15, 8, 12]],
                                             [[10, 10, 0, 20, 9, 11], [7, 13, 9, 0, 21, 10]])


def empty_rows_layout() -> BlockSparseLayout:
    """Shared 6 x 6 blocks of 10 tokens: rows 0 and 4-5 read nothing (the last shard's queries read no key),
    row 1 reads only block 5, rows 2-3 their neighbours."""
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[1, 5] = True
    mask[2, 1:4] = True
    mask[3, 2:4] = True
    return BlockSparseLayout.from_block_mask(mask, [10] * 6, [10] * 6)


def band_layout() -> BlockSparseLayout:
    """Each of 12 frames of 5 tokens reads itself and its two neighbours: ranks skip the shards they never read."""
    idx = torch.arange(12)
    return BlockSparseLayout.from_block_mask((idx[:, None] - idx[None]).abs() <= 1, [5] * 12, [5] * 12)


# name -> (layout, shard sizes of the 3 ranks, backend, q heads, kv heads, head dim)
def cases():
    lvsa = PATTERN.plan(T, P, step=1)
    after = PATTERN.plan(T, P, step=2, text_tokens=5, text_position="after")
    before = PATTERN.plan(T, P, step=0, text_tokens=7, text_position="before")
    return {
        "lvsa_even": (lvsa, [20, 20, 20], "reference", 2, 2, 8),
        "lvsa_gqa_uneven": (lvsa, [13, 31, 16], "reference", 4, 2, 8),
        "text_after": (after, [22, 22, 21], "reference", 2, 2, 8),
        "text_before_empty_shard": (before, [0, 30, 37], "reference", 2, 2, 8),
        "per_head": (per_head_layout(), [20, 23, 17], "reference", 2, 2, 8),
        "empty_rows": (empty_rows_layout(), [25, 15, 20], "reference", 2, 1, 8),
        "band": (band_layout(), [20, 20, 20], "reference", 2, 2, 8),
        "lvsa_triton": (lvsa, [21, 19, 20], "triton", 2, 2, 16),
    }


def inputs(layout: BlockSparseLayout, heads: int, kv_heads: int, dim: int):
    g = torch.Generator().manual_seed(layout.q_len + heads)
    q = torch.randn(2, layout.q_len, heads, dim, generator=g)
    k, v = (torch.randn(2, layout.kv_len, kv_heads, dim, generator=g) for _ in range(2))
    return q, k, v


def replay(layout, shards, rank, q, k, v, backend="reference"):
    """Rank ``rank``'s ring result without processes: its parts on the keys the plan gives it, merged."""
    plan = rank_plan(layout, shards, rank)
    a, b = shards.range(rank)
    out = torch.zeros(q[:, a:b].shape)
    lse = torch.full((q.shape[0], q.shape[2], b - a), float("-inf"))
    for s, part in enumerate(plan.parts):
        if part is None:
            continue
        idx = torch.arange(a, b) if s == rank else plan.recv(s).index()
        o, l = block_sparse_attn(q[:, a:b], k[:, idx], v[:, idx], part, backend=backend, return_lse=True)
        merge_partial(out, lse, o, l)
    return out, lse


# ---------------------------------------------------------------------------------------------- in process
@pytest.mark.parametrize("name", [n for n in cases() if n != "lvsa_triton"])
@pytest.mark.parametrize("split", ["case", "four_uneven"])
def test_replayed_ring_equals_one_process(name, split):
    layout, sizes, backend, h, hk, d = cases()[name]
    q, k, v = inputs(layout, h, hk, d)
    want, want_lse = block_sparse_attn(q, k, v, layout, backend=backend, return_lse=True)
    S = layout.q_len
    shards = SequenceShards.from_sizes(sizes if split == "case" else [7, S - 7 - 29, 0, 29])
    for r in range(shards.ranks):
        a, b = shards.range(r)
        out, lse = replay(layout, shards, r, q, k, v, backend)
        torch.testing.assert_close(out, want[:, a:b], **TOL)
        torch.testing.assert_close(lse, want_lse[:, :, a:b], **TOL)


def test_plan_reads_only_what_the_layout_selects():
    layout = band_layout()  # rank r reads its own shard plus one frame of each neighbour
    plan = ring_plan(layout, SequenceShards.split(60, 3))
    assert [[plan.runs[r][s].tokens for s in range(3)] for r in range(3)] == [[20, 5, 0], [5, 20, 5], [0, 5, 20]]
    assert plan.runs[0][1].starts.tolist() == [20] and plan.runs[0][1].ends.tolist() == [25]
    assert [p is None for p in rank_plan(layout, plan.shards, 0).parts] == [False, False, True]
    assert plan.traffic().sent_tokens == 20 and plan.traffic().dense_tokens == 120
    # empty_rows: the last shard's queries read nothing; rank 0 reads block 5 (in shard 2), rank 1 nothing of it
    plan = ring_plan(empty_rows_layout(), SequenceShards.from_sizes([25, 15, 20]))
    assert [[plan.runs[r][s].tokens for s in range(3)] for r in range(3)] == [[15, 15, 10], [15, 15, 0], [0, 0, 0]]
    assert all(p is None for p in rank_plan(empty_rows_layout(), plan.shards, 2).parts)
    assert [p is None for p in rank_plan(empty_rows_layout(), plan.shards, 1).parts] == [False, False, True]


def test_plans_are_cached_per_layout_and_shards():
    layout = PATTERN.plan(T, P, step=1)
    shards = SequenceShards.split(60, 3)
    assert rank_plan(layout, shards, 1) is rank_plan(layout, shards, 1)
    assert ring_plan(layout, shards) is ring_plan(layout, SequenceShards.split(60, 3))
    assert ring_plan(layout, shards) is not ring_plan(layout, SequenceShards.split(60, 2))


@pytest.mark.parametrize("ranks, expected", [(2, 0.1736), (4, 0.1736), (8, 0.1736)])
def test_wan_121_frames_traffic_is_at_most_40_percent_of_a_dense_ring(ranks, expected):
    """Wan 14B at 720p: T=121 latent frames x 3600 tokens, W=3 (the model's LVSA defaults), step 0."""
    layout = get_model("wan").pattern(window=3).plan(121, 3600, step=0)
    traffic = ring_plan(layout, SequenceShards.split(layout.q_len, ranks)).traffic()
    assert traffic.dense_tokens == (ranks - 1) * 121 * 3600
    assert traffic.ratio == pytest.approx(expected, abs=1e-4)
    assert traffic.ratio <= 0.40


def test_key_runs_index_and_packing():
    runs = KeyRuns(torch.tensor([3, 10]), torch.tensor([5, 13]))
    assert runs.tokens == 5
    assert runs.index().tolist() == [3, 4, 10, 11, 12]
    assert runs.index(3).tolist() == [0, 1, 7, 8, 9]
    assert runs.packed(torch.tensor([0, 3, 4, 5, 9, 11, 13, 20])).tolist() == [0, 0, 1, 2, 2, 3, 5, 5]


def test_sub_layout_cuts_blocks_at_the_shard_edges():
    layout = band_layout()
    part = sub_layout(layout, (7, 18), KeyRuns(torch.tensor([0, 20]), torch.tensor([3, 22])))
    # query blocks 1-3 cut to [7, 10), [10, 15), [15, 18); key block 0 cut to 3 tokens, block 4 to 2
    assert part.q_offsets.tolist() == [[0, 3, 8, 11]]
    assert part.kv_offsets.tolist() == [[0, 3, 3, 3, 3, 5]]
    assert part.to_block_mask()[0].tolist() == [[True, False, False, False, False],
                                                [False, False, False, False, False],
                                                [False, False, False, False, True]]
    assert sub_layout(layout, (0, 5), KeyRuns(torch.tensor([30]), torch.tensor([40]))) is None


def test_merge_partial_keeps_rows_without_keys_at_zero():
    out = torch.zeros(1, 2, 1, 4)
    lse = torch.full((1, 1, 2), float("-inf"))
    merge_partial(out, lse, torch.zeros(1, 2, 1, 4), torch.full((1, 1, 2), float("-inf")))
    assert out.abs().max() == 0 and torch.isneginf(lse).all()
    part = torch.ones(1, 2, 1, 4)
    merge_partial(out, lse, part, torch.tensor([[[0.0, float("-inf")]]]))
    assert out[0, 0].tolist() == [[1.0] * 4] and out[0, 1].abs().max() == 0
    merge_partial(out, lse, 3 * part, torch.tensor([[[0.0, 2.0]]]))
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(lse[0, 0], torch.tensor([torch.log(torch.tensor(2.0)).item(), 2.0]))


def test_shard_and_layout_errors():
    with pytest.raises(ValueError, match=r"non-decreasing token offsets starting at 0, got \(0, 5, 3\)"):
        SequenceShards((0, 5, 3))
    with pytest.raises(ValueError, match="sizes: expected non-negative"):
        SequenceShards.from_sizes([4, -1])
    with pytest.raises(ValueError, match=r"covers 60 query x 60 key tokens but the shards \(0, 30, 61\)"):
        ring_plan(band_layout(), SequenceShards((0, 30, 61)))
    with pytest.raises(ValueError, match="rank: expected 0 <= rank < 2"):
        rank_plan(band_layout(), SequenceShards.split(60, 2), 2)


# ---------------------------------------------------------------------------------------------- 3 processes
def _worker(rank: int, res: dict) -> None:
    for name, (layout, sizes, backend, h, hk, d) in cases().items():
        q, k, v = inputs(layout, h, hk, d)
        shards = SequenceShards.from_sizes(sizes)
        a, b = shards.range(rank)
        counter = TrafficCounter()
        res[name] = ring_attention(q[:, a:b], k[:, a:b], v[:, a:b], layout, None, shards, backend=backend,
                                   return_lse=True, counter=counter)
        res[name + "/traffic"] = counter
    layout, sizes = cases()["lvsa_even"][:2]
    q, k, v = inputs(layout, 2, 2, 8)
    res["err_size"] = error(lambda: ring_attention(q[:, :19], k[:, :19], v[:, :19], layout, None,
                                                   SequenceShards.from_sizes(sizes)))
    res["err_world"] = error(lambda: ring_attention(q[:, :30], k[:, :30], v[:, :30], layout, None,
                                                    SequenceShards.split(60, 2)))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("ring"))
    return run_ranks(_worker, WORLD, tmp)


@pytest.mark.parametrize("name", list(cases()))
def test_ring_processes_equal_one_process(ranks, name):
    layout, sizes, backend, h, hk, d = cases()[name]
    q, k, v = inputs(layout, h, hk, d)
    want, want_lse = block_sparse_attn(q, k, v, layout, backend=backend, return_lse=True)
    shards = SequenceShards.from_sizes(sizes)
    for r, res in enumerate(ranks):
        a, b = shards.range(r)
        out, lse = res[name]
        assert out.dtype == q.dtype and out.shape == (2, b - a, h, d)
        torch.testing.assert_close(out, want[:, a:b], **TOL)
        torch.testing.assert_close(lse, want_lse[:, :, a:b], **TOL)


@pytest.mark.parametrize("name", list(cases()))
def test_traffic_counter_matches_the_plan(ranks, name):
    layout, sizes, _, _, hk, d = cases()[name]
    shards = SequenceShards.from_sizes(sizes)
    plan = ring_plan(layout, shards)
    per_token = 2 * 2 * hk * d * 4  # k and v, B=2, fp32
    counters = [res[name + "/traffic"] for res in ranks]
    assert [c.calls for c in counters] == [1] * WORLD
    assert [c.sent_bytes for c in counters] == [plan.sent_tokens(r) * per_token for r in range(WORLD)]
    assert [c.dense_bytes for c in counters] == [(WORLD - 1) * n * per_token for n in sizes]
    total = sum(c.sent_bytes for c in counters) / sum(c.dense_bytes for c in counters)
    assert total == pytest.approx(plan.traffic().ratio)


def test_lvsa_ring_sends_less_than_a_dense_ring(ranks):
    counters = [res["lvsa_even/traffic"] for res in ranks]
    assert sum(c.sent_bytes for c in counters) / sum(c.dense_bytes for c in counters) < 0.75
    assert sum(c.sent_bytes for c in (res["band/traffic"] for res in ranks)) == 20 * 2 * 2 * 2 * 8 * 4


@pytest.mark.parametrize("key, words", [
    ("err_size", ["holds shard", "of 20 tokens but q has S_r=19", "[20, 20, 20]"]),
    ("err_world", ["2 shards (0, 30, 60) for a process group of 3 ranks"]),
])
def test_ring_errors(ranks, key, words):
    for res in ranks:
        assert res[key].startswith("ValueError:"), res[key]
        for w in words:
            assert w in res[key], res[key]
