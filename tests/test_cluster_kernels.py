"""SVOO's cluster path: the real Triton kernels (packed cluster attention, key-tile planner, fused
assignment argmax) against references.

Without CUDA these run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1), in fp16/fp32;
on a CUDA machine they run on the GPU and add bf16.
"""
import pytest
import torch

import cluster_schedule_oracle as oracle
from lvsa_kernels import SVOOPattern
from lvsa_kernels.reference.svoo import assign, co_cluster, segment_means
from lvsa_kernels.triton_src import cluster_launch, cluster_path
from lvsa_kernels.triton_src.cluster_launch import ClusterConfig, assign_labels, cluster_attention, cluster_config
from lvsa_kernels.triton_src.cluster_schedule import build_cluster_schedule
from lvsa_kernels.triton_src.tuning import KernelConfig

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if CUDA else [])
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# interpreter tiles: big 32-row tiles plus 16-row remainder tiles; on CUDA the shipped config
SMALL = None if CUDA else ClusterConfig((KernelConfig(32, 16, 1, 1), KernelConfig(16, 16, 1, 1)))


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def random_sizes(g, groups, n, total, empty=2):
    """int64 [groups, n] cluster sizes summing to ``total`` per group, with ``empty`` empty clusters."""
    out = []
    for _ in range(groups):
        cuts = torch.sort(torch.randint(0, total + 1, (n - 1,), generator=g)).values
        sizes = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([total])]))
        sizes[torch.randperm(n, generator=g)[:empty]] = 0
        sizes[0] += total - sizes.sum()
        out.append(sizes)
    return torch.stack(out)


def token_mask(mask, q_labels, k_labels):
    """bool [G, S, S]: token i attends token j iff mask[g, label_q(i), label_k(j)]."""
    G = mask.shape[0]
    rows = mask[torch.arange(G)[:, None], q_labels]              # [G, S, n_k]
    return torch.gather(rows, 2, k_labels[:, None, :].expand(-1, q_labels.shape[1], -1))


def masked_reference(q, k, v, allowed, scale):
    """float64 masked attention on [B, S, H, D] with allowed [B*H, S, S]; empty rows -> 0, lse -inf."""
    B, S, H, D = q.shape
    qg, kg, vg = (x.double().transpose(1, 2).reshape(B * H, S, D) for x in (q, k, v))
    s = (qg @ kg.transpose(1, 2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.clamp(min=-1e300).unsqueeze(-1)).nan_to_num(0.0)
    out = (p @ vg).view(B, H, S, D).transpose(1, 2)
    return out, lse.view(B, H, S)


def labels_and_perm(sizes, g):
    """Random labels with the given cluster sizes, and their stable argsort."""
    G, n = sizes.shape
    labels = torch.stack([torch.repeat_interleave(torch.arange(n), sizes[i])[torch.randperm(int(sizes[i].sum()),
                                                                                              generator=g)]
                          for i in range(G)])
    return labels, torch.sort(labels, dim=1, stable=True).indices


def run_case(B, S, H, D, n_q, n_k, dtype, seed, window=16, strided=False, p=0.4, scale=None):
    g = torch.Generator().manual_seed(seed)
    G = B * H
    q_sizes, k_sizes = random_sizes(g, G, n_q, S), random_sizes(g, G, n_k, S)
    q_labels, q_perm = labels_and_perm(q_sizes, g)
    k_labels, k_perm = labels_and_perm(k_sizes, g)
    mask = torch.rand(G, n_q, n_k, generator=g) < p
    mask[:, 0] = False          # a query cluster with no keys: output 0, lse -inf
    mask[:, 1] = True           # a dense row
    x = torch.randn(3, B, S, H, 2 * D if strided else D, generator=g).to(DEVICE, dtype)
    q, k, v = (t[..., :D] for t in x) if strided else x
    scale = D ** -0.5 if scale is None else scale
    cfg = SMALL or cluster_config(q.device, q.dtype, D)
    sched = build_cluster_schedule(mask.to(DEVICE), q_sizes.to(DEVICE), k_sizes.to(DEVICE), S, cfg.tiles, window)
    kp, vp = cluster_path.permute_keys(k, v, k_perm.to(DEVICE))
    out, lse = cluster_attention(q, kp, vp, q_perm.to(DEVICE, torch.int32), sched, scale, cfg)
    ref, ref_lse = masked_reference(q.cpu(), k.cpu(), v.cpu(), token_mask(mask & (k_sizes > 0)[:, None], q_labels,
                                                                             k_labels), scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    assert rel_err(out.cpu(), ref) <= TOL[dtype], rel_err(out.cpu(), ref)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert torch.allclose(lse.cpu()[finite].double(), ref_lse[finite], atol=1e-5 if dtype == torch.float32 else 2e-3)
    assert (~finite).any() and out.cpu().transpose(1, 2)[~finite].eq(0).all()  # keyless rows: exactly 0
    return sched, out


@pytest.mark.parametrize("dtype", DTYPES)
def test_cluster_attention_equals_masked_reference(dtype):
    run_case(B=2, S=97, H=2, D=16, n_q=5, n_k=11, dtype=dtype, seed=1)


@pytest.mark.parametrize("scale", [0.0, -0.7, 3.0])
def test_cluster_attention_any_finite_scale(scale):
    """Ragged key tiles are masked after scaling: scale 0 gave NaN, a negative scale a wrong row max."""
    run_case(B=1, S=61, H=2, D=16, n_q=4, n_k=9, dtype=torch.float32, seed=3, scale=scale)


def key_tiles_of_row(key_tiles, window, r):
    """[(c0, c1, kv_rows of columns c0..c1-1, full)] of row r decoded from its records as the kernel does."""
    n_full, n_part = (int(x) for x in key_tiles.count[r].cpu())
    slots, w = key_tiles.records.shape[1], window
    recs = key_tiles.records[r].cpu().long()
    out = []
    for t in list(range(n_full)) + list(range(slots - n_part, slots)):
        c0, c1, d0 = (int(x) for x in recs[t, :3])
        cols = torch.arange(c0, c1)
        rows = cols + d0
        for i in range(1, w):
            rows += torch.where(cols >= recs[t, 2 * i + 1], recs[t, 2 * i + 2], 0)
        out.append((c0, c1, rows, t < n_full))
    return out


def test_window_limited_key_tiles_and_strided_inputs():
    """Many tiny key clusters: key tiles end where WINDOW segments end, not only at BLOCK_N columns."""
    sched, _ = run_case(B=1, S=120, H=2, D=32, n_q=3, n_k=60, dtype=torch.float32, seed=2, window=2, strided=True,
                        p=0.8)
    kt = sched.parts[0][1]
    rows = kt.count.shape[0]
    widths = [c1 - c0 for r in range(rows) for c0, c1, _, _ in key_tiles_of_row(kt, sched.window, r)]
    assert max(widths) <= kt.block_n
    assert sum(w < kt.block_n for w in widths) > rows  # more than one partial tile per row


def test_key_tiles_cover_every_selected_key_once():
    """Decoded key tiles map every selected key token of a row to its KP row exactly once."""
    g = torch.Generator().manual_seed(3)
    G, n_q, n_k, S = 2, 4, 40, 200
    q_sizes, k_sizes = random_sizes(g, G, n_q, S), random_sizes(g, G, n_k, S, empty=5)
    mask = torch.rand(G, n_q, n_k, generator=g) < 0.6
    k_start = torch.cat([torch.zeros(G, 1, dtype=torch.long), k_sizes.cumsum(1)], 1)
    for window in (1, 4, 16):
        sched = build_cluster_schedule(mask.to(DEVICE), q_sizes.to(DEVICE), k_sizes.to(DEVICE), S, [(16, 16)], window)
        kt = sched.parts[0][1]
        for r in range(G * n_q):
            gi, i = divmod(r, n_q)
            expected = torch.cat([torch.arange(int(k_start[gi, j]), int(k_start[gi, j + 1]))
                                  for j in range(n_k) if mask[gi, i, j]] + [torch.zeros(0, dtype=torch.long)])
            assert int(sched.keys_per_row[r]) == expected.numel()
            tiles = sorted(key_tiles_of_row(kt, window, r), key=lambda x: x[0])
            assert torch.equal(torch.cat([t[2] for t in tiles] + [torch.zeros(0, dtype=torch.long)]), expected)
            assert all(c1 - c0 == 16 if full else 0 < c1 - c0 < 16 for c0, c1, _, full in tiles)
            assert len(tiles) <= S // 16 + n_k // window + 1


@pytest.mark.parametrize("tiles", [[(16, 16)], [(16, 16), (8, 16)]])
def test_query_tiles_partition_every_cluster_heaviest_first(tiles):
    """Big and small query tiles together cover every query position once, within its cluster; small tiles
    hold only remainders of at most their rows; each launch runs heavier rows first."""
    g = torch.Generator().manual_seed(4)
    G, n_q, n_k, S = 3, 6, 8, 150
    q_sizes, k_sizes = random_sizes(g, G, n_q, S), random_sizes(g, G, n_k, S)
    mask = torch.rand(G, n_q, n_k, generator=g) < 0.5
    sched = build_cluster_schedule(mask.to(DEVICE), q_sizes.to(DEVICE), k_sizes.to(DEVICE), S, tiles)
    assert [(qt.block_m, kt.block_n) for qt, kt in sched.parts] == tiles
    work = sched.keys_per_row.cpu()
    starts = torch.cat([torch.zeros(G, 1, dtype=torch.long), q_sizes.cumsum(1)], 1)
    for gi in range(G):
        covered = torch.zeros(S, dtype=torch.int64)
        for qt, _ in sched.parts:
            q0, q1, row = (t[gi].cpu().long() for t in (qt.q0, qt.q1, qt.row))
            used = q1 > q0
            for a, b, r in zip(q0[used], q1[used], row[used]):
                i = int(r) - gi * n_q
                assert starts[gi, i] <= a < b <= starts[gi, i + 1] and b - a <= qt.block_m
                covered[a:b] += 1
                if qt.block_m < tiles[0][0]:  # a small tile is the whole remainder of its cluster
                    assert b == starts[gi, i + 1] and (b - starts[gi, i]) % tiles[0][0] == b - a
            w = work[row[used]]
            assert torch.all(w[:-1] >= w[1:])
        assert torch.equal(covered, torch.ones(S, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if CUDA else []))
def test_fused_assignment_equals_reference_argmax(dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 77, 32, generator=g)
    w = torch.randn(2, 19, 32, generator=g)
    got = assign_labels(x.to(DEVICE), w.to(DEVICE), dtype).cpu()
    if dtype == torch.float32:
        assert torch.equal(got, assign(x, w))
    else:  # bf16 products: the chosen cluster's score is within rounding of the best
        s = x @ w.transpose(1, 2)
        chosen = torch.gather(s, 2, got.unsqueeze(-1)).squeeze(-1)
        assert torch.all(chosen >= s.max(-1).values - 0.05 * s.abs().max())
    tie = torch.ones(1, 3, 32)  # every cluster scores the same: lowest index, as `assign`
    assert assign_labels(tie.to(DEVICE), torch.ones(1, 5, 32, device=DEVICE), torch.float32).cpu().eq(0).all()


def test_co_cluster_with_fused_assignment_equals_reference():
    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(2, 90, 16, generator=g), torch.randn(2, 90, 16, generator=g)
    ref = co_cluster(q, k, 4, 9, iterations=2, seed=3)
    got = co_cluster(q.to(DEVICE), k.to(DEVICE), 4, 9, iterations=2, seed=3,
                     assign_fn=cluster_path.assign_fn(q.to(DEVICE)), means_fn=cluster_path.means_fn)
    for a, b in ((ref.q, got.q), (ref.k, got.k)):
        assert torch.equal(a.labels, b.labels.cpu()) and torch.equal(a.perm, b.perm.cpu())
        torch.testing.assert_close(a.centroids, b.centroids.cpu(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cluster_means_through_permutation_and_in_order(dtype):
    """Triton segment sums == `segment_means`, for strided [B, S, H, D] through perm and [G, S, D] in order."""
    g = torch.Generator().manual_seed(8)
    B, S, H, D, n = 2, 70, 3, 32, 9
    x = torch.randn(B, S, H, 2 * D, generator=g)[..., :D]
    sizes = random_sizes(g, B * H, n, S, empty=2)
    labels, perm = labels_and_perm(sizes, g)
    previous = torch.randn(B * H, n, D, generator=g)
    xg = x.to(dtype).float().transpose(1, 2).reshape(B * H, S, D)
    ref, ref_sizes = segment_means(xg, labels, n, previous)
    assert torch.equal(ref_sizes, sizes)
    got = cluster_path.cluster_means(x.to(DEVICE, dtype), sizes.to(DEVICE), previous.to(DEVICE), perm.to(DEVICE))
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-5, atol=1e-5)
    in_order = torch.gather(xg, 1, perm[..., None].expand(-1, -1, D)).to(DEVICE, dtype)
    got = cluster_path.cluster_means(in_order, sizes.to(DEVICE), previous.to(DEVICE))
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pattern_cluster_path_equals_layout_path_on_recluster_and_reuse_steps(dtype):
    """`SVOOPattern.attention(backend="triton")` (device plan, packed kernel) == the host-layout path."""
    B, S, H, D = 2, 130, 2, 32
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(B, S, H, D, generator=g).to(DEVICE, dtype) for _ in range(3))
    pat = SVOOPattern(top_p=0.8, q_clusters=4, k_clusters=10, warmup_steps=1, recluster_every=2)
    dense = SVOOPattern(top_p=1.0, q_clusters=4, k_clusters=10, warmup_steps=0)
    allowed = torch.ones(B * H, S, S, dtype=torch.bool)
    dense_ref = masked_reference(q.cpu(), k.cpu(), v.cpu(), allowed, D ** -0.5)[0]
    for step in range(4):  # dense, re-cluster, reuse, re-cluster (warm start)
        out = pat.attention(q, k, v, step, 0, backend="triton", branch="cond")
        assert out.shape == q.shape and torch.isfinite(out).all()
        if step == 0:
            assert rel_err(out.cpu(), dense_ref) <= TOL[dtype]
            continue
        entry = pat._cache[(0, "cond")]
        assert entry.step == step and entry.clustering.q.perm.device == q.device
        assert rel_err(out.cpu(), cluster_reference(pat, q, k, v, step)) <= TOL[dtype]
    # top_p = 1 keeps every non-empty key cluster: exactly dense attention
    assert rel_err(dense.attention(q, k, v, 0, 0, backend="triton").cpu(), dense_ref) <= TOL[dtype]


def cluster_reference(pattern, q, k, v, step):
    """float64 masked attention with the clusters and block map the pattern used at this step."""
    B, S, H, D = q.shape
    cl = pattern._cache[(0, "cond")].clustering
    mask = pattern._block_map(cl, step, 0, B, H, D ** -0.5).cpu()
    allowed = token_mask(mask & (cl.k.sizes.cpu() > 0)[:, None], cl.q.labels.cpu(), cl.k.labels.cpu())
    return masked_reference(q.cpu(), k.cpu(), v.cpu(), allowed, D ** -0.5)[0]


def test_unsupported_inputs_are_named():
    from lvsa_kernels.backends import BackendUnavailable

    pat = SVOOPattern(top_p=0.9, q_clusters=2, k_clusters=4, warmup_steps=0)
    q = torch.randn(1, 32, 1, 24, device=DEVICE)  # head dim 24 is not a power of two
    with pytest.raises(BackendUnavailable, match="head dims"):
        pat.attention(q, q, q, 0, 0, backend="triton")


def test_torch_compile_fullgraph_traces_through_the_cluster_op():
    B, S, H, D, n_q, n_k = 1, 64, 2, 16, 3, 7
    g = torch.Generator().manual_seed(9)
    q_sizes, k_sizes = random_sizes(g, B * H, n_q, S, empty=0), random_sizes(g, B * H, n_k, S, empty=1)
    q_labels, q_perm = labels_and_perm(q_sizes, g)
    k_labels, k_perm = labels_and_perm(k_sizes, g)
    mask = torch.rand(B * H, n_q, n_k, generator=g) < 0.6
    q, k, v = (torch.randn(B, S, H, D, generator=g).to(DEVICE) for _ in range(3))
    cfg = SMALL or cluster_config(q.device, q.dtype, D)
    sched = build_cluster_schedule(mask.to(DEVICE), q_sizes.to(DEVICE), k_sizes.to(DEVICE), S, cfg.tiles)
    kp, vp = cluster_path.permute_keys(k, v, k_perm.to(DEVICE))
    qperm = q_perm.to(DEVICE, torch.int32)

    @torch.compile(fullgraph=True, backend="eager" if not CUDA else "inductor")
    def f(q):
        return cluster_attention(q, kp, vp, qperm, sched, D ** -0.5, cfg)[0] * 2.0

    ref = masked_reference(q.cpu(), k.cpu(), v.cpu(), token_mask(mask & (k_sizes > 0)[:, None], q_labels, k_labels),
                           D ** -0.5)[0]
    assert rel_err(f(q).cpu(), 2.0 * ref) <= TOL[torch.float32]


def test_svoo_attention_under_torch_compile():
    """A compiled function calling the stateful SVOO pattern runs it eagerly (torch.compiler.disable)."""
    B, S, H, D = 1, 96, 2, 16
    g = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(B, S, H, D, generator=g).to(DEVICE) for _ in range(3))
    pat = SVOOPattern(top_p=0.8, q_clusters=3, k_clusters=6, warmup_steps=0)
    eager = pat.attention(q, k, v, 0, 0, backend="triton")
    compiled = torch.compile(lambda q, k, v: pat.attention(q, k, v, 1, 0, backend="triton"),
                             backend="eager" if not CUDA else "inductor")
    assert rel_err(compiled(q, k, v).cpu(), eager.cpu()) <= 1e-6


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_video_clusters_with_trailing_text(backend):
    """Text after the video (HunyuanVideo): video clusters attend their selected video clusters and all text,
    text attends everything; the text is never permuted. Cluster path and host-layout path alike."""
    B, n_video, n_text, H, D = 2, 100, 20, 2, 16
    S = n_video + n_text
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(B, S, H, D, generator=g).to(DEVICE) for _ in range(3))
    pat = SVOOPattern(top_p=0.5, q_clusters=4, k_clusters=8, warmup_steps=0, recluster_every=2)
    for step in (0, 1):  # cluster, then reuse
        out = pat.attention(q, k, v, step, 0, backend=backend, branch="c", text_tokens=n_text)
        cl = pat._cache[(0, "c")].clustering
        mask = pat._block_map(cl, step, 0, B, H, D ** -0.5).cpu()
        video = token_mask(mask & (cl.k.sizes.cpu() > 0)[:, None], cl.q.labels.cpu(), cl.k.labels.cpu())
        allowed = torch.ones(B * H, S, S, dtype=torch.bool)
        allowed[:, :n_video, :n_video] = video
        ref = masked_reference(q.cpu(), k.cpu(), v.cpu(), allowed, D ** -0.5)[0]
        assert video.float().mean() < 0.9 and rel_err(out.cpu(), ref) <= TOL[torch.float32]
    dense = SVOOPattern(top_p=1.0, q_clusters=4, k_clusters=8, warmup_steps=0)
    full = masked_reference(q.cpu(), k.cpu(), v.cpu(), torch.ones(B * H, S, S, dtype=torch.bool), D ** -0.5)[0]
    assert rel_err(dense.attention(q, k, v, 0, 0, backend=backend, text_tokens=n_text).cpu(), full) <= 2e-5
    with pytest.raises(ValueError, match="text_tokens"):
        pat.attention(q, k, v, 2, 0, backend=backend, text_tokens=S)


@pytest.mark.parametrize("tiles,window", [([(16, 16)], 4), ([(16, 16), (8, 16)], 2), ([(32, 16), (16, 8)], 4),
                                          ([(16, 8), (8, 16)], 1)])
@pytest.mark.parametrize("n_q,n_k", [(5, 13), (8, 32)])
def test_device_planner_equals_tensor_op_planner_bit_for_bit(tiles, window, n_q, n_k):
    """The two Triton planning launches give exactly the tiles of the tensor-op planner they replaced
    (`cluster_schedule_oracle`): keys per row, every used key-tile record and count, every query-tile slot."""
    g = torch.Generator().manual_seed(n_q * 100 + window)
    G, S = 3, 150
    q_sizes, k_sizes = random_sizes(g, G, n_q, S), random_sizes(g, G, n_k, S, empty=3)
    mask = torch.rand(G, n_q, n_k, generator=g) < 0.5
    mask[0, 1] = False  # a row with no keys
    mask[1, 0] = True
    sched = build_cluster_schedule(mask.to(DEVICE), q_sizes.to(DEVICE), k_sizes.to(DEVICE), S, tiles, window)
    seg_cum, seg_delta, keys = oracle.segments(mask, k_sizes)
    assert torch.equal(sched.keys_per_row.cpu(), keys)
    for (qt, kt), ref_q in zip(sched.parts, oracle.query_tiles(keys, q_sizes, tiles)):
        for got, ref in zip((qt.row, qt.q0, qt.q1), ref_q):
            assert torch.equal(got.cpu().long(), ref)
        ref_k = oracle.key_tiles(seg_cum, seg_delta, kt.block_n, window)
        records, count = kt.records.cpu().tolist(), kt.count.cpu().tolist()
        slots = len(records[0])
        for r, (full, part) in enumerate(ref_k):
            assert count[r] == [len(full), len(part)]
            assert records[r][:len(full)] == full
            assert records[r][slots - len(part):][::-1] == part  # partial tiles fill from the back


@pytest.mark.parametrize("top_p", [0.3, 0.9, 1.0])
def test_fused_selection_equals_reference_selection(top_p):
    """`cluster_path.select_blocks` (GEMM + one Triton program per query cluster) == the PyTorch selection,
    with profile floors (0, some, more than the clusters), empty key clusters and tied masses."""
    from lvsa_kernels.reference.svoo import select_blocks

    g = torch.Generator().manual_seed(11)
    G, n_q, n_k, d = 4, 5, 37, 16
    qc, kc = torch.randn(G, n_q, d, generator=g), torch.randn(G, n_k, d, generator=g)
    kc[:, 3] = kc[:, 4]  # equal logits: ties broken by the lower index
    sizes = torch.randint(0, 6, (G, n_k), generator=g)
    sizes[:, 3:5] = 2
    floor = torch.tensor([0, 3, 12, 50])
    ref = select_blocks(qc, kc, sizes, top_p, floor, 0.7)
    got = cluster_path.select_blocks(qc.to(DEVICE), kc.to(DEVICE), sizes.to(DEVICE), top_p, floor.to(DEVICE), 0.7)
    assert torch.equal(got.cpu(), ref)
    assert 0 < int(ref.sum()) < ref.numel()


# --- the Hopper cluster kernel (sm_90) against the portable one and the reference, over one plan --------------

HOPPER = CUDA and cluster_launch.cluster_hopper_refusal(torch.empty(1, 1, 1, 64, device="cuda")
                                                       .to(torch.bfloat16)) is None
needs_hopper = pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU and a Triton release the Hopper cluster "
                                                     "kernel is offered on (cluster_launch.CLUSTER_TRITON)")
needs_cuda = pytest.mark.skipif(not CUDA, reason="head dims 64/128 at these sizes are for the GPU")
KERNEL_CHOICES = ["portable", pytest.param("hopper", marks=needs_hopper)]


def with_single_tokens(sizes, g, count):
    """``sizes`` with ``count`` non-empty clusters per group cut to one token (the rest moved to the largest)."""
    sizes = sizes.clone()
    for row in sizes:
        big = int(row.argmax())
        for j in torch.randperm(len(row), generator=g).tolist():
            if count and j != big and row[j] > 1:
                row[big] += row[j] - 1
                row[j] = 1
                count -= 1
    return sizes


def kernel_config(kernel, D, block_n=128, stages=None):
    """One launch of 128-row query tiles and ``block_n``-column key tiles on ``kernel``."""
    if kernel == "hopper":
        return ClusterConfig((KernelConfig(128, block_n, 4, stages or (2 if D > 64 else 4), kernel="hopper"),))
    return ClusterConfig((KernelConfig(128, block_n, 8 if D > 64 else 4, 3),))


def poisoned_call(fn, q):
    """``fn()`` after freeing NaN-filled blocks of the output's and lse's sizes (the caching allocator hands them
    back), so a row the kernel forgets to write stays NaN."""
    B, S, H, _ = q.shape
    junk = [torch.full_like(q, float("nan")), torch.full((B, H, S), float("nan"), device=q.device)]
    del junk
    return fn()


def kernels_case(kernel, dtype, D, seed, B=2, S=700, H=2, n_q=6, n_k=40, window=4, block_n=128, stages=None,
                 p=0.35, scale=None, singles=3):
    """Run ``kernel`` and the portable kernel over one plan; check both against float64 attention over the plan's
    selected keys (empty clusters, one-token clusters, a keyless and a dense row per group)."""
    g = torch.Generator().manual_seed(seed)
    G = B * H
    q_sizes = with_single_tokens(random_sizes(g, G, n_q, S, empty=1), g, 1)
    k_sizes = with_single_tokens(random_sizes(g, G, n_k, S, empty=3), g, singles)
    q_labels, q_perm = labels_and_perm(q_sizes, g)
    k_labels, k_perm = labels_and_perm(k_sizes, g)
    mask = torch.rand(G, n_q, n_k, generator=g) < p
    mask[:, 0] = False
    mask[:, 1] = True
    q, k, v = (torch.randn(B, S, H, D, generator=g).to(DEVICE, dtype) for _ in range(3))
    scale = D ** -0.5 if scale is None else scale
    cfg = kernel_config(kernel, D, block_n, stages)
    sched = build_cluster_schedule(mask.to(DEVICE), q_sizes.to(DEVICE), k_sizes.to(DEVICE), S, cfg.tiles, window)
    kp, vp = cluster_path.permute_keys(k, v, k_perm.to(DEVICE))
    qperm = q_perm.to(DEVICE, torch.int32)
    out, lse = poisoned_call(lambda: cluster_attention(q, kp, vp, qperm, sched, scale, cfg), q)
    portable, portable_lse = cluster_attention(q, kp, vp, qperm, sched, scale, kernel_config("portable", D, block_n))
    ref, ref_lse = masked_reference(q.cpu(), k.cpu(), v.cpu(), token_mask(mask & (k_sizes > 0)[:, None], q_labels,
                                                                             k_labels), scale)
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    assert rel_err(out.cpu(), ref) <= TOL[dtype], rel_err(out.cpu(), ref)
    assert rel_err(out.cpu(), portable.cpu().double()) <= TOL[dtype]
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite) and torch.equal(torch.isfinite(portable_lse.cpu()), finite)
    assert torch.allclose(lse.cpu()[finite].double(), ref_lse[finite], atol=2e-3)
    assert (~finite).any() and out.cpu().transpose(1, 2)[~finite].eq(0).all()  # keyless rows: exactly 0
    return sched


@needs_cuda
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kernel", KERNEL_CHOICES)
def test_cluster_kernels_equal_reference_over_one_plan(kernel, dtype, D):
    """Query clusters over two tiles (ping-pong), of 65-127 rows and of at most 64 (one busy consumer), of one
    token; empty and one-token key clusters; full and partial key tiles; batch 2."""
    sched = kernels_case(kernel, dtype, D, seed=20 + D)
    qt, kt = sched.parts[0]
    rows = (qt.q1 - qt.q0).cpu()
    assert (rows > 64).any() and ((rows > 0) & (rows <= 64)).any()
    assert (kt.count[:, 0] > 0).any() and (kt.count[:, 1] > 0).any()


@needs_cuda
@pytest.mark.parametrize("kernel", KERNEL_CHOICES)
def test_cluster_kernels_on_tiny_key_clusters(kernel):
    """Hundreds of 1-3 token key clusters: key tiles end where their WINDOW segments end, so most are partial
    (the masked walk), here with 64-column key tiles in a 4-stage ring."""
    sched = kernels_case(kernel, torch.bfloat16, 128, seed=31, S=640, n_k=300, window=2, block_n=64, stages=4,
                         p=0.5, singles=40)
    count = sched.parts[0][1].count.cpu()
    assert count[:, 1].sum() > count[:, 0].sum()


@needs_cuda
@pytest.mark.parametrize("scale", [0.0, -0.7])
@pytest.mark.parametrize("kernel", KERNEL_CHOICES)
def test_cluster_kernels_any_finite_scale(kernel, scale):
    kernels_case(kernel, torch.bfloat16, 64, seed=41, B=1, S=300, scale=scale)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kernel", KERNEL_CHOICES)
def test_pattern_picks_the_cluster_kernel_and_matches_reference(kernel, dtype, monkeypatch):
    """`SVOOPattern.attention(backend="triton")` at head dim 64 with trailing text, batch 2, re-cluster and reuse
    steps, on the kernel ``LVSA_KERNELS_CLUSTER_KERNEL`` names (the launches counted)."""
    monkeypatch.setenv(cluster_launch.KERNEL_ENV, kernel)
    launches = []
    real = cluster_launch._launch_hopper
    monkeypatch.setattr(cluster_launch, "_launch_hopper", lambda *a, **kw: (launches.append(1), real(*a, **kw)))
    B, n_video, n_text, H, D = 2, 400, 30, 2, 64
    S = n_video + n_text
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(B, S, H, D, generator=g).to(DEVICE, dtype) for _ in range(3))
    pat = SVOOPattern(top_p=0.5, q_clusters=5, k_clusters=24, warmup_steps=0, recluster_every=2)
    for step in (0, 1):
        out = pat.attention(q, k, v, step, 0, backend="triton", branch="c", text_tokens=n_text)
        cl = pat._cache[(0, "c")].clustering
        mask = pat._block_map(cl, step, 0, B, H, D ** -0.5).cpu()
        allowed = torch.ones(B * H, S, S, dtype=torch.bool)
        allowed[:, :n_video, :n_video] = token_mask(mask & (cl.k.sizes.cpu() > 0)[:, None], cl.q.labels.cpu(),
                                                    cl.k.labels.cpu())
        ref = masked_reference(q.cpu(), k.cpu(), v.cpu(), allowed, D ** -0.5)[0]
        assert torch.isfinite(out).all() and rel_err(out.cpu(), ref) <= TOL[dtype]
    assert bool(launches) == (kernel == "hopper")


def test_cluster_kernel_choice(monkeypatch):
    """``LVSA_KERNELS_CLUSTER_KERNEL``: auto picks the Hopper kernel where it can run; ``hopper`` where it
    cannot run is an error naming why; anything else is refused."""
    q = torch.empty(1, 8, 1, 64, device=DEVICE, dtype=torch.bfloat16 if CUDA else torch.float16)
    monkeypatch.delenv(cluster_launch.KERNEL_ENV, raising=False)
    assert cluster_launch.cluster_kernel(q) == ("hopper" if HOPPER else "portable")
    monkeypatch.setenv(cluster_launch.KERNEL_ENV, "portable")
    assert cluster_launch.cluster_kernel(q) == "portable"
    monkeypatch.setenv(cluster_launch.KERNEL_ENV, "fastest")
    with pytest.raises(ValueError, match="LVSA_KERNELS_CLUSTER_KERNEL.*fastest"):
        cluster_launch.cluster_kernel(q)
    assert cluster_launch.cluster_hopper_refusal(q.float()) is not None
    if not HOPPER:
        monkeypatch.setenv(cluster_launch.KERNEL_ENV, "hopper")
        with pytest.raises(ValueError, match="hopper: the Hopper cluster kernel"):
            cluster_launch.cluster_kernel(q)
    cfg = cluster_config(torch.device("cuda"), torch.bfloat16, 128, "hopper")
    assert cfg.kernel == "hopper" and cfg.tiles == [(128, 128)]
    with pytest.raises(ValueError, match="kernel"):
        cluster_config(torch.device("cuda"), torch.bfloat16, 128, "fast")


def test_hopper_cluster_kernel_refuses_what_it_cannot_compile_or_fit():
    """Strides of 16 bytes but not 16 elements (the Q gather's 16-byte copies would not compile) and rings
    beyond an sm_90 block's shared memory are refused before any launch."""
    q = torch.empty(1, 8, 2, 72, dtype=torch.bfloat16)[..., :64]  # row stride 144 bytes = 72 elements
    assert "divisible by 16 elements" in cluster_launch._hopper_alignment_refusal(q)
    assert cluster_launch._hopper_alignment_refusal(torch.empty(1, 8, 2, 64, dtype=torch.bfloat16)) is None
    fits = cluster_launch.hopper_shared_memory_refusal
    assert "bytes of shared memory" in fits(KernelConfig(128, 128, 4, 4, kernel="hopper"), 2, 128)
    assert fits(KernelConfig(128, 128, 4, 3, kernel="hopper"), 2, 128) is None
    assert fits(KernelConfig(128, 128, 4, 4, kernel="hopper"), 2, 64) is None
