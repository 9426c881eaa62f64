"""Triton kernels of the SVOO cluster path: packed cluster-block attention, the
fused assignment GEMM + argmax of the co-clustering, the row permutation of K/V and deterministic
per-cluster sums (centroids).

Vocabulary (all per group ``g = b * H + h``; ``R = G * n_q`` rows, one per query cluster):

- K and V are permuted into key-cluster order once (``KP, VP [G, N, D]``); a row's *segments* are its
  selected key clusters, contiguous ranges of KP in cluster order.
- A row's selected keys, concatenated, form its *packed* key sequence: column ``c`` of segment ``s`` is
  KP row ``c + seg_delta[s]`` where ``seg_cum[s] <= c < seg_cum[s + 1]``. A 74-token cluster then fills
  74 columns of a 128-column tile instead of a tile of its own.
- *Key tiles* cut the packed sequence into pieces of at most ``BLOCK_N`` columns that touch at most
  ``WINDOW`` segments. `cluster_plan.plan_key_tiles` cuts them greedily (one program per row) and writes a
  small record per tile from which the attention kernel maps its columns to KP rows with ``WINDOW - 1``
  element-wise selects (no reduction, no index list).

Queries are never copied: a query tile is up to ``BLOCK_M`` consecutive positions of one query
cluster in cluster order, and the kernel reads their rows straight from ``q [B, S, H, D]`` through the
permutation and writes ``out`` / ``lse`` back to the original token positions.
"""
import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _key_tile(acc, m_i, l_i, q, k_base, v_base, rec, qk_scale,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, WINDOW: tl.constexpr, MASKED: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """Fold the key tile described by record ``rec`` (see `cluster_plan.plan_key_tiles`) into the online softmax."""
    cols = tl.load(rec) + tl.arange(0, BLOCK_N)
    kv_rows = cols + tl.load(rec + 2)
    for w in tl.static_range(1, WINDOW):
        kv_rows += tl.where(cols >= tl.load(rec + 2 * w + 1), tl.load(rec + 2 * w + 2), 0)
    kv_offs = kv_rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    if MASKED:
        valid = cols < tl.load(rec + 1)
        k = tl.load(k_base + kv_offs, mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_base + kv_offs)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASKED:  # scale before masking: 0 * -inf would be NaN
        qk = tl.where(valid[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
    else:  # qk_scale >= 0 (see `cluster_attn_fwd`) keeps the row max under scaling
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_base + kv_offs, mask=valid[:, None], other=0.0)
    else:
        v = tl.load(v_base + kv_offs)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def cluster_attn_fwd(
    Q, KP, VP, O, LSE, Q_PERM,
    stride_qb, stride_qs, stride_qh,
    stride_ob, stride_os, stride_oh,
    tile_row, tile_q0, tile_q1, key_tiles, key_count,
    qk_scale, seq_len, q_slots, key_slots,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program = one query tile (slot ``program_id(0)``) of group ``program_id(1)``.

    Q, O ``[B, S, H, D]`` (any strides, contiguous head dim), KP/VP ``[G, S, D]`` contiguous in key-cluster
    order, Q_PERM ``[G, S]`` int32 (position -> token), LSE ``[B, H, S]`` float32. Query tile slots
    ``[G, q_slots]`` (``tile_q0 == tile_q1``: no tile); key tile records ``[R, key_slots, 2 * WINDOW + 1]``
    and counts ``[R, 2]`` from `cluster_plan.plan_key_tiles`: full tiles run without masks, then the partial ones.
    """
    pid_t = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    slot = g * q_slots + pid_t
    q0 = tl.load(tile_q0 + slot)
    q1 = tl.load(tile_q1 + slot)
    if q0 >= q1:
        return
    r = tl.load(tile_row + slot).to(tl.int64)
    b = g // NUM_HEADS
    h = g % NUM_HEADS

    offs_m = q0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q1
    tok = tl.load(Q_PERM + g * seq_len + offs_m, mask=row_ok, other=0).to(tl.int64)
    q = tl.load(Q + b * stride_qb + h * stride_qh + tok[:, None] * stride_qs + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    if qk_scale < 0:  # softmax(q k * s) = softmax(-q k * |s|): keep qk_scale >= 0 for `_key_tile`
        q = -q
        qk_scale = -qk_scale

    k_base = KP + g * seq_len * HEAD_DIM  # per-group offsets fit int32
    v_base = VP + g * seq_len * HEAD_DIM
    recs = key_tiles + r * key_slots * (2 * WINDOW + 1)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for t in range(0, tl.load(key_count + 2 * r)):
        acc, m_i, l_i = _key_tile(acc, m_i, l_i, q, k_base, v_base, recs + t * (2 * WINDOW + 1), qk_scale,
                                  BLOCK_N, HEAD_DIM, WINDOW, False, DOT_PRECISION)
    for t in range(key_slots - tl.load(key_count + 2 * r + 1), key_slots):
        acc, m_i, l_i = _key_tile(acc, m_i, l_i, q, k_base, v_base, recs + t * (2 * WINDOW + 1), qk_scale,
                                  BLOCK_N, HEAD_DIM, WINDOW, True, DOT_PRECISION)

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + tok[:, None] * stride_os + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None])
    lse = tl.where(has_keys, (m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0))) * LN2, float("-inf"))
    tl.store(LSE + g * seq_len + tok, lse, mask=row_ok)


@triton.jit
def assign_argmax(X, W, LABELS, stride_xg, stride_xn, n_rows, n_clusters,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """``LABELS[g, i] = argmax_j X[g, i]·W[g, j]`` (first index on ties) without materialising the scores.

    X ``[G, n_rows, D]`` (contiguous head dim), W ``[G, n_clusters, D]`` contiguous; LABELS int64 ``[G, n_rows]``.
    Program = ``BLOCK_M`` rows of group ``program_id(1)``.
    """
    g = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < n_rows
    x = tl.load(X + g * stride_xg + offs_m[:, None].to(tl.int64) * stride_xn + offs_d[None, :], mask=row_ok[:, None],
                other=0.0)
    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    best_j = tl.zeros([BLOCK_M], dtype=tl.int32)
    offs_j = tl.arange(0, BLOCK_J)
    for j0 in range(0, n_clusters, BLOCK_J):
        cols = j0 + offs_j
        w = tl.load(W + (g * n_clusters + cols[:, None]) * HEAD_DIM + offs_d[None, :],
                    mask=(cols < n_clusters)[:, None], other=0.0)
        s = tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
        s = tl.where((cols < n_clusters)[None, :], s, float("-inf"))
        tile_best, tile_j = tl.max(s, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best > best  # strict: an earlier tile keeps its index on ties
        best = tl.where(better, tile_best, best)
        best_j = tl.where(better, j0 + tile_j, best_j)
    tl.store(LABELS + g * n_rows + offs_m, best_j.to(tl.int64), mask=row_ok)


@triton.jit
def permute_rows(X, PERM, OUT, stride_xb, stride_xs, stride_xh, seq_len,
                 NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    """``OUT[g, s] = X[b, PERM[g, s], h]`` for ``g = b * NUM_HEADS + h``: X ``[B, S, H, D]`` (any strides,
    contiguous head dim) into OUT ``[G, S, D]`` contiguous; PERM int64 ``[G, S]``."""
    g = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs < seq_len
    tok = tl.load(PERM + g * seq_len + offs, mask=ok, other=0)
    x = tl.load(X + (g // NUM_HEADS) * stride_xb + (g % NUM_HEADS) * stride_xh + tok[:, None] * stride_xs
                + offs_d[None, :], mask=ok[:, None], other=0.0)
    tl.store(OUT + (g * seq_len + offs[:, None]) * HEAD_DIM + offs_d[None, :], x, mask=ok[:, None])


@triton.jit
def segment_means(X, PERM, SIZES, PREVIOUS, MEANS, stride_xb, stride_xs, stride_xh, seq_len, n_clusters,
                  NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                  HAS_PERM: tl.constexpr):
    """``MEANS[g, j]`` = float32 mean of ``X[b, PERM[g, s], h]`` over the ``SIZES[g, j]`` positions s of cluster j
    (clusters are consecutive runs of positions; identity order without PERM), summed in a fixed order
    (deterministic, no atomics); an empty cluster keeps ``PREVIOUS[g, j]``.

    X ``[B, S, H, D]`` (any strides, contiguous head dim), PERM int64 ``[G, S]``, SIZES int64 ``[G, n_clusters]``,
    PREVIOUS float32 and MEANS float32 ``[G, n_clusters, D]`` contiguous. Program = cluster ``program_id(0)`` of
    group ``program_id(1)``.
    """
    j = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    lo = tl.load(SIZES + g * n_clusters) * 0
    for c0 in range(0, j, BLOCK_C):  # the cluster's first position: sizes of the clusters before it
        lo += tl.sum(tl.load(SIZES + g * n_clusters + c0 + offs_c, mask=c0 + offs_c < j, other=0), 0)
    size = tl.load(SIZES + g * n_clusters + j)
    hi = lo + size
    base = X + (g // NUM_HEADS) * stride_xb + (g % NUM_HEADS) * stride_xh
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
    for s0 in range(lo, hi, BLOCK_R):
        pos = s0 + offs_r
        ok = pos < hi
        if HAS_PERM:
            tok = tl.load(PERM + g * seq_len + pos, mask=ok, other=0)
        else:
            tok = pos
        acc += tl.load(base + tok[:, None] * stride_xs + offs_d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    out = MEANS + (g * n_clusters + j) * HEAD_DIM + offs_d
    if size > 0:
        tl.store(out, tl.math.div_rn(tl.sum(acc, axis=0), size.to(tl.float32)))  # IEEE, as torch divides
    else:
        tl.store(out, tl.load(PREVIOUS + (g * n_clusters + j) * HEAD_DIM + offs_d))
