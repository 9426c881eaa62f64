"""SVOO planner: co-clustering rule, selection, layouts, permutation and the pattern's attention (CPU)."""
import math

import pytest
import torch
import torch.nn.functional as F

from lvsa_kernels import SVOOPattern, block_sparse_attn
from lvsa_kernels.backends import registered_backends
from lvsa_kernels.reference import svoo
from lvsa_kernels.reference.svoo import (
    assign, assignment_weights, co_cluster, permute_tokens, segment_means,
    select_blocks, strided_seeds, unpermute_tokens,
)
from lvsa_kernels.reference.svoo_profile import ProfileError, SVOOProfile


def _rand(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _naive_labels(x, c_self, c_other):
    """Per token: argmax_j cos(x @ c_otherᵀ, rownorm(c_self @ c_otherᵀ)_j), first maximum wins."""
    proj = c_self @ c_other.T
    p = proj / torch.sqrt((proj * proj).sum(-1, keepdim=True) + 1e-8)
    out = []
    for tok in x:
        cos = F.cosine_similarity((tok @ c_other.T)[None], p, dim=-1)
        out.append(int(torch.argmax(cos)))
    return torch.tensor(out)


def _naive_mean(x, labels, n, previous):
    cents, sizes = previous.clone(), torch.zeros(n, dtype=torch.int64)
    for j in range(n):
        sel = labels == j
        sizes[j] = int(sel.sum())
        if sizes[j]:
            cents[j] = x[sel].mean(0)
    return cents, sizes


def _clustered(G, N, d, centers, spread, seed):
    """Tokens around ``centers`` random centres per group (fresh random, never zeros)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(G, centers, d, generator=g, dtype=torch.float64) * 2.0
    idx = torch.randint(0, centers, (G, N), generator=g)
    return torch.gather(c, 1, idx[..., None].expand(G, N, d)) + spread * torch.randn(G, N, d, generator=g,
                                                                                     dtype=torch.float64)


def _bshd(x_g, B, H):
    """[B*H, S, D] -> [B, S, H, D]."""
    G, S, D = x_g.shape
    return x_g.view(B, H, S, D).transpose(1, 2).contiguous()


def _masked_sdpa(q, k, v, mask):
    """q, k, v [B, S, H, D]; mask bool [B, H, Sq, Skv] (True = attend)."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return o.transpose(1, 2)


# ---------------------------------------------------------------------------------------------- clustering
def test_assignment_rule_equals_naive_cosine():
    x, cs, co = _rand(1, 120, 16, seed=1), _rand(1, 9, 16, seed=2), _rand(1, 5, 16, seed=3)
    labels = assign(x, assignment_weights(cs, co))
    assert torch.equal(labels[0], _naive_labels(x[0], cs[0], co[0]))


def test_assign_ties_and_zero_rows_take_lowest_index():
    x = torch.cat([torch.zeros(1, 1, 4, dtype=torch.float64), _rand(1, 3, 4, seed=4)], dim=1)
    w = _rand(1, 1, 4, seed=5).expand(1, 3, 4).clone()  # three identical clusters: every token ties
    assert assign(x, w).tolist() == [[0, 0, 0, 0]]


def test_co_cluster_equals_naive_iterations():
    G, N, d, nq, nk = 2, 48, 8, 4, 6
    q, k = _rand(G, N, d, seed=6), _rand(G, N, d, seed=7)
    res = co_cluster(q, k, nq, nk, iterations=2, seed=3)
    cq, ck = strided_seeds(q, nq, 3, side=0), strided_seeds(k, nk, 3, side=1)
    for g in range(G):
        a, b = cq[g], ck[g]
        for _ in range(2):
            lk = _naive_labels(k[g], b, a)
            b, sk = _naive_mean(k[g], lk, nk, b)
            lq = _naive_labels(q[g], a, b)
            a, sq = _naive_mean(q[g], lq, nq, a)
        assert torch.equal(res.k.labels[g], lk) and torch.equal(res.q.labels[g], lq)
        assert torch.equal(res.k.sizes[g], sk) and torch.equal(res.q.sizes[g], sq)
        torch.testing.assert_close(res.k.centroids[g], b)
        torch.testing.assert_close(res.q.centroids[g], a)


def test_segment_means_empty_clusters_keep_previous_centroid():
    x = _rand(1, 10, 3, seed=8)
    labels = torch.tensor([[0, 2, 2, 0, 4, 4, 4, 0, 2, 4]])
    previous = _rand(1, 5, 3, seed=9)
    cents, sizes = segment_means(x, labels, 5, previous)
    ref_c, ref_s = _naive_mean(x[0], labels[0], 5, previous[0])
    assert sizes[0].tolist() == [3, 0, 3, 0, 4] and torch.equal(sizes[0], ref_s)
    torch.testing.assert_close(cents[0], ref_c)
    assert torch.equal(cents[0, 1], previous[0, 1]) and torch.equal(cents[0, 3], previous[0, 3])


def test_more_clusters_than_tokens_gives_empty_clusters():
    q, k = _rand(1, 6, 4, seed=10), _rand(1, 6, 4, seed=11)
    res = co_cluster(q, k, 8, 10, iterations=2)
    assert int(res.q.sizes.sum()) == 6 and int(res.k.sizes.sum()) == 6
    assert (res.k.sizes == 0).any() and (res.q.sizes == 0).any()


def test_co_cluster_deterministic_and_permutation_contiguous():
    q, k = _rand(3, 200, 16, dtype=torch.float32, seed=12), _rand(3, 200, 16, dtype=torch.float32, seed=13)
    a, b = co_cluster(q, k, 8, 16, seed=5), co_cluster(q, k, 8, 16, seed=5)
    for side in ("q", "k"):
        ca, cb = getattr(a, side), getattr(b, side)
        assert torch.equal(ca.labels, cb.labels) and torch.equal(ca.centroids, cb.centroids)
        sorted_labels = torch.gather(ca.labels, 1, ca.perm)
        assert (sorted_labels[:, 1:] >= sorted_labels[:, :-1]).all()
        assert torch.equal(torch.sort(ca.perm, dim=1).values, torch.arange(200).expand(3, 200))
        assert torch.equal(ca.sizes, F.one_hot(ca.labels, ca.sizes.shape[1]).sum(1))


def test_chunked_clustering_equals_single_chunk(monkeypatch):
    q, k = _rand(2, 90, 8, dtype=torch.float32, seed=36), _rand(2, 90, 8, dtype=torch.float32, seed=37)
    whole = co_cluster(q, k, 5, 7, seed=2)
    monkeypatch.setattr(svoo, "_CHUNK_ELEMENTS", 64)  # a few rows per chunk
    chunked = co_cluster(q, k, 5, 7, seed=2)
    for side in ("q", "k"):
        a, b = getattr(whole, side), getattr(chunked, side)
        assert torch.equal(a.labels, b.labels) and torch.equal(a.sizes, b.sizes)
        torch.testing.assert_close(a.centroids, b.centroids)


def test_warm_start_uses_given_centroids():
    q, k = _clustered(2, 150, 8, 3, 0.1, seed=14), _clustered(2, 150, 8, 3, 0.1, seed=15)
    seeds = (strided_seeds(q, 4, 7, side=0), strided_seeds(k, 5, 7, side=1))
    cold = co_cluster(q, k, 4, 5, iterations=2, seed=7)
    warm = co_cluster(q, k, 4, 5, iterations=2, init=seeds)
    assert torch.equal(warm.q.labels, cold.q.labels) and torch.equal(warm.k.centroids, cold.k.centroids)
    other = co_cluster(q, k, 4, 5, iterations=1, init=(cold.q.centroids, cold.k.centroids))
    ref = _naive_labels(k[0], cold.k.centroids[0], cold.q.centroids[0])
    assert torch.equal(other.k.labels[0], ref)


def test_co_cluster_rejects_bad_arguments():
    q = _rand(1, 8, 4)
    with pytest.raises(ValueError, match="iterations"):
        co_cluster(q, q, 2, 2, iterations=0)
    with pytest.raises(ValueError, match="init"):
        co_cluster(q, q, 2, 2, init=(torch.zeros(1, 3, 4), torch.zeros(1, 2, 4)))


# ---------------------------------------------------------------------------------------------- selection
def test_select_blocks_top_p_prefix_floor_and_empty_clusters():
    qc = torch.zeros(1, 1, 4)  # equal logits: mass is proportional to cluster size
    kc = _rand(1, 5, 4, dtype=torch.float32, seed=16)
    sizes = torch.tensor([[5, 3, 1, 1, 0]])
    zero = torch.zeros(1, dtype=torch.int64)
    pick = lambda p, floor: select_blocks(qc, kc, sizes, p, floor, 0.5)[0, 0].nonzero().flatten().tolist()
    assert pick(0.3, zero) == [0]            # first cluster alone crosses 0.3
    assert pick(0.7, zero) == [0, 1]         # 0.5 <= 0.7 -> the crossing cluster 1 is kept
    assert pick(0.85, zero) == [0, 1, 2]     # 0.8 <= 0.85 -> cluster 2 kept (tie with 3: lower index first)
    assert pick(0.3, torch.tensor([3])) == [0, 1, 2]
    assert pick(0.3, torch.tensor([5])) == [0, 1, 2, 3]   # the floor never keeps the empty cluster 4
    assert pick(1.0, zero) == [0, 1, 2, 3]


def test_pattern_layout_attention_matches_reference_and_masked_original_order():
    B, S, H, D = 2, 96, 2, 16
    q, k, v = _rand(B, S, H, D, seed=17), _rand(B, S, H, D, seed=18), _rand(B, S, H, D, seed=19)
    pat = SVOOPattern(top_p=0.6, q_clusters=6, k_clusters=12, warmup_steps=0)
    plan = pat.plan(q, k, step=0, layer=0)
    assert len(plan.layouts) == B and all(l.num_heads == H for l in plan.layouts)
    assert 0 < min(l.density for l in plan.layouts) and max(l.density for l in plan.layouts) < 1
    qp, kp, vp = (permute_tokens(t, p) for t, p in ((q, plan.q_perm), (k, plan.k_perm), (v, plan.k_perm)))
    perm_mask = torch.stack([l.to_token_mask() for l in plan.layouts])          # [B, H, S, S] permuted order
    for b, layout in enumerate(plan.layouts):
        out_p = block_sparse_attn(qp[b:b + 1], kp[b:b + 1], vp[b:b + 1], layout, backend="reference")
        torch.testing.assert_close(out_p, _masked_sdpa(qp[b:b + 1], kp[b:b + 1], vp[b:b + 1], perm_mask[b:b + 1]))
    orig_mask = torch.zeros_like(perm_mask)
    bi, hi = torch.arange(B)[:, None, None, None], torch.arange(H)[None, :, None, None]
    orig_mask[bi, hi, plan.q_perm[:, :, :, None], plan.k_perm[:, :, None, :]] = perm_mask
    out = pat.attention(q, k, v, step=0, layer=0, backend="reference")
    torch.testing.assert_close(out, _masked_sdpa(q, k, v, orig_mask))


def test_top_p_one_equals_dense():
    B, S, H, D = 1, 80, 3, 8
    q, k, v = _rand(B, S, H, D, seed=20), _rand(B, S, H, D, seed=21), _rand(B, S, H, D, seed=22)
    pat = SVOOPattern(top_p=1.0, q_clusters=5, k_clusters=9, warmup_steps=0)
    plan = pat.plan(q, k, 0, 0)
    assert plan.layouts[0].is_dense
    out = pat.attention(q, k, v, 0, 0, backend="reference")
    torch.testing.assert_close(out, _masked_sdpa(q, k, v, None))


def test_recall_meets_top_p_on_clustered_inputs():
    B, S, H, D, top_p = 1, 256, 2, 16, 0.9
    q = _bshd(_clustered(H, S, D, 6, 0.05, seed=23), B, H)
    k = _bshd(_clustered(H, S, D, 6, 0.05, seed=24), B, H)
    pat = SVOOPattern(top_p=top_p, q_clusters=12, k_clusters=24, warmup_steps=0)
    plan = pat.plan(q, k, 0, 0)
    mask_p = plan.layouts[0].to_token_mask()                                    # [H, S, S] permuted
    mask = torch.zeros_like(mask_p)
    hi = torch.arange(H)[:, None, None]
    mask[hi, plan.q_perm[0][:, :, None], plan.k_perm[0][:, None, :]] = mask_p
    probs = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D), dim=-1)[0]
    recall = (probs * mask).sum(-1)                                              # [H, S] mass covered per query
    assert float(recall.mean()) >= top_p
    assert plan.layouts[0].density < 0.6


def test_permute_round_trip():
    x = _rand(2, 30, 3, 4, dtype=torch.float32, seed=25)
    perm = torch.stack([torch.randperm(30, generator=torch.Generator().manual_seed(i)) for i in range(6)]).view(2, 3, 30)
    y = permute_tokens(x, perm)
    assert torch.equal(y[1, 5, 2], x[1, perm[1, 2, 5], 2])
    assert torch.equal(unpermute_tokens(y, perm), x)


# ---------------------------------------------------------------------------------------------- pattern schedule
def test_dense_steps_and_layers_run_dense():
    B, S, H, D = 1, 40, 2, 8
    q, k, v = _rand(B, S, H, D, seed=26), _rand(B, S, H, D, seed=27), _rand(B, S, H, D, seed=28)
    pat = SVOOPattern(q_clusters=4, k_clusters=8, warmup_steps=2, dense_layers=[3])
    assert pat.plan(q, k, 1, 0).dense and pat.plan(q, k, 5, 3).dense and not pat.plan(q, k, 2, 0).dense
    torch.testing.assert_close(pat.attention(q, k, v, 0, 0, backend="reference"), _masked_sdpa(q, k, v, None))


def test_reuse_refreshes_centroids_from_cached_labels_per_branch():
    B, S, H, D = 1, 64, 2, 8
    q1, k1 = _rand(B, S, H, D, seed=29), _rand(B, S, H, D, seed=30)
    q2, k2 = _rand(B, S, H, D, seed=31), _rand(B, S, H, D, seed=32)
    pat = SVOOPattern(q_clusters=4, k_clusters=8, warmup_steps=1, recluster_every=3)
    cond = pat.plan(q1, k1, 1, 0, cache_key="cond")
    uncond = pat.plan(q2, k2, 1, 0, cache_key="uncond")
    assert cond.reclustered and uncond.reclustered
    reuse = pat.plan(q2, k2, 2, 0, cache_key="cond")                          # new inputs, cond labels
    assert not reuse.reclustered
    assert torch.equal(reuse.clustering.q.labels, cond.clustering.q.labels)
    assert torch.equal(reuse.q_perm, cond.q_perm) and torch.equal(reuse.k_perm, cond.k_perm)
    gq = q2.transpose(1, 2).reshape(B * H, S, D)
    expected, _ = segment_means(gq, cond.clustering.q.labels, 4, cond.clustering.q.centroids)
    torch.testing.assert_close(reuse.clustering.q.centroids, expected)
    assert not torch.equal(uncond.clustering.k.labels, cond.clustering.k.labels)
    assert pat.plan(q1, k1, 4, 0, cache_key="cond").reclustered              # (4 - 1) % 3 == 0


def test_profile_floor_per_head():
    keep = torch.tensor([[[0.05, 0.5, 0.17]]])                                 # 1 step, 1 layer, 3 heads
    pat = SVOOPattern(profile=SVOOProfile(keep), k_clusters=100, warmup_steps=0, clip=(0.15, 0.20))
    assert pat.min_blocks(0, 0, 3).tolist() == [15, 20, 17]
    with pytest.raises(ProfileError, match="step 2"):
        pat.min_blocks(1, 0, 3)
    with pytest.raises(ValueError, match="heads"):
        pat.min_blocks(0, 0, 4)


def test_profile_floor_is_at_least_one_cluster_for_any_positive_ratio():
    """Published rule: ``max(1, int(ratio * k_clusters))`` for ratio > 0 (a tiny ratio used to give 0)."""
    keep = torch.tensor([[[0.001, 0.0, 0.5]]])
    pat = SVOOPattern(profile=SVOOProfile(keep), k_clusters=100, warmup_steps=0, clip=(0.0, 1.0))
    assert pat.min_blocks(0, 0, 3).tolist() == [1, 0, 50]


@pytest.mark.parametrize("kwargs, name", [
    (dict(q_clusters=2.0), "q_clusters"), (dict(k_clusters=True), "k_clusters"), (dict(iterations=0), "iterations"),
    (dict(warmup_steps=-1), "warmup_steps"), (dict(top_p="0.9"), "top_p"), (dict(seed=1.5), "seed"),
    (dict(clip=(0.1, "x")), "clip"), (dict(dense_layers=1.0), "dense_layers"),
])
def test_pattern_knobs_are_typed(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SVOOPattern(**kwargs)


def test_pattern_rejects_gqa_and_bad_knobs():
    with pytest.raises(ValueError, match="H_kv"):
        SVOOPattern(warmup_steps=0).plan(_rand(1, 8, 4, 8), _rand(1, 8, 2, 8), 0, 0)
    with pytest.raises(ValueError, match="iterations"):
        SVOOPattern(iterations=0)
    with pytest.raises(ValueError, match="top_p"):
        SVOOPattern(top_p=0)


@pytest.mark.skipif("triton" not in registered_backends(), reason="triton backend not registered")
def test_triton_backend_on_svoo_layout():
    """The host-built SVOO layouts run on the block-sparse Triton kernel (the non-cluster path)."""
    B, S, H, D = 1, 96, 2, 16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (_rand(B, S, H, D, dtype=torch.float32, seed=s).to(device) for s in (33, 34, 35))
    pat = SVOOPattern(top_p=0.7, q_clusters=4, k_clusters=8, warmup_steps=0)
    plan = pat.plan(q, k, 0, 0)
    qp, kp, vp = (permute_tokens(x, p) for x, p in ((q, plan.q_perm), (k, plan.k_perm), (v, plan.k_perm)))
    out = unpermute_tokens(block_sparse_attn(qp, kp, vp, plan.layouts[0], backend="triton"), plan.q_perm)
    ref = pat.attention(q.cpu(), k.cpu(), v.cpu(), 0, 0, backend="reference")
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)


def test_cached_densities_report_the_selected_token_share():
    B, S, H, D = 1, 64, 2, 8
    q, k, v = (_rand(B, S, H, D, dtype=torch.float32, seed=s) for s in (40, 41, 42))
    dense = SVOOPattern(top_p=1.0, q_clusters=3, k_clusters=5, warmup_steps=0)
    dense.plan(q, k, 0, 0, cache_key="c")
    assert dense.cached_densities() == {(0, "c"): 1.0}
    sparse = SVOOPattern(top_p=0.3, q_clusters=3, k_clusters=5, warmup_steps=0)
    plan = sparse.plan(q, k, 0, 0)
    assert sparse.cached_densities()[(0, None)] == pytest.approx(plan.layouts[0].density)
