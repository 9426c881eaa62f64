"""Hopper (sm_90) SVOO cluster attention in Gluon: the packed cluster kernel of `cluster_attn.py` (same plan,
same results), warp-specialised like the LVSA Hopper kernel (`block_sparse_hopper.py`).

One program computes one query tile (up to 128 consecutive positions of one query cluster, rows read through
the permutation) for one group ``g = b * H + h``, in three partitions that meet in shared memory:

* producer (4 warps): gathers the tile's Q rows once (two 64-row halves), then every key tile of the row (its
  full tiles, then its partial ones; records of `cluster_plan.plan_key_tiles`) as a K tile and a V tile into a
  ``STAGES``-deep ring, with ``cp.async`` (16 bytes per thread and copy) into NVMMA-swizzled shared memory:
  a key tile's columns map to KP rows through its record (``WINDOW - 1`` selects per column), so it is no TMA
  box. Columns past a partial tile's end are zero-filled by the copy (no NaN can reach ``P V``). After
  committing tile ``j``'s K rows it waits for its own copies up to ``K_{j-STAGES+2}`` (``cp.async.wait_group``),
  fences them for the async proxy (wgmma), meets its other warps (partition barrier) and arrives once on
  ``k_ready`` of that tile and ``v_ready`` of the one before (see `_produce`);
* two consumers (one warpgroup each, 64 query rows each), as in the LVSA Hopper kernel: ``S = Q K^T`` by wgmma
  from shared memory, online softmax in registers (exp2 domain, fp32), ``O += P V`` with P from registers,
  the next tile's ``Q K^T`` issued before the previous tile's ``P V``, and ping-pong turns between the two
  consumers (`hopper_ring.wait_turn`). Partial tiles are the only masked ones (columns from the
  tile's width on get -inf after scaling). Each consumer arrives once per tile on ``k_empty`` / ``v_empty``.

Rows without keys write 0 and lse = -inf. The kernel takes a non-negative softmax scale (the host negates q for
a negative one). The CPU interpreter cannot run Gluon: this kernel is compiled for sm_90a in CI
(`compile_check`); the portable kernel keeps the interpreter tests.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, warpgroup_mma, warpgroup_mma_wait,
)

from .gluon_compat import async_commit_group, async_load, async_wait_group, cta_barrier
from .hopper_ring import HALF_M, LN2, give_turn, pass_ring, ring_barriers, wait_turn

COPY_ROWS = gl.constexpr(64)  # rows per gather step of the producer (Triton 3.6 puts a partition barrier between steps)


@gluon.jit
def _copy_rows(dst, base, row_off, valid, layout: gl.constexpr):
    """``cp.async`` rows ``base + row_off[i]`` (``valid[i]``; others zero-filled) into ``dst [len(row_off), D]``."""
    HEAD_DIM: gl.constexpr = dst.type.shape[1]
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
    async_load(dst, base + row_off[:, None] + cols[None, :], mask=valid[:, None])


@gluon.jit
def _gather_q(dst, q_base, stride_qs, perm_base, p0, q1, layout: gl.constexpr):
    """Rows of query positions ``p0 ..`` (below ``q1``) into ``dst [64, D]``, each read at its token."""
    ROWS: gl.constexpr = dst.type.shape[0]
    for c in gl.static_range(ROWS // COPY_ROWS):
        pos = p0 + c * COPY_ROWS + gl.arange(0, COPY_ROWS, layout=gl.SliceLayout(1, layout))
        valid = pos < q1
        tok = gl.load(perm_base + pos, mask=valid, other=0).to(gl.int64)
        _copy_rows(dst.slice(c * COPY_ROWS, COPY_ROWS), q_base, tok * stride_qs, valid, layout)


@gluon.jit
def _gather_keys(dst, base, rec, layout: gl.constexpr, WINDOW: gl.constexpr):
    """The KP (or VP) rows of key tile ``rec`` (record of `cluster_plan.plan_key_tiles`) into ``dst [BLOCK_N, D]``."""
    BLOCK_N: gl.constexpr = dst.type.shape[0]
    HEAD_DIM: gl.constexpr = dst.type.shape[1]
    c0 = gl.load(rec)
    c1 = gl.load(rec + 1)
    delta = gl.load(rec + 2)
    for c in gl.static_range(BLOCK_N // COPY_ROWS):
        cols = c0 + c * COPY_ROWS + gl.arange(0, COPY_ROWS, layout=gl.SliceLayout(1, layout))
        rows = cols + delta
        for w in gl.static_range(1, WINDOW):
            rows += gl.where(cols >= gl.load(rec + 2 * w + 1), gl.load(rec + 2 * w + 2), 0)
        _copy_rows(dst.slice(c * COPY_ROWS, COPY_ROWS), base, rows * HEAD_DIM, cols < c1, layout)


@gluon.jit
def _produce(args, WINDOW: gl.constexpr):
    """Fill the ring. Each thread's copies form groups in the order Q, K_0, V_0, K_1, V_1, ...; ``wait_group(n)``
    waits for all but its newest n groups. After committing ``K_j`` the producer waits for ``K_{j-LAG}`` (and
    everything older; ``LAG = STAGES - 2`` K tiles stay in flight), then publishes ``k_ready`` of tile ``j - LAG``
    and ``v_ready`` of tile ``j - LAG - 1``; tile 0's ``k_ready`` also covers Q. Why this order cannot deadlock:
    the slots it waits for next are freed by ``Q K^T`` of tile ``j - STAGES`` and ``P V`` of tile ``j - STAGES``,
    which need at most tiles ``j - STAGES + 1`` (K) and ``j - STAGES`` (V), published by now; a K tile is
    published once it lands, not when the next slot frees (the consumers would stall on each other)."""
    (q_smem, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, recs, n_full, n_kv, rec_shift, q0, q1,
     perm_base, q_base, stride_qs, k_base, v_base) = args
    STAGES: gl.constexpr = k_smem.type.shape[0]
    HEAD_DIM: gl.constexpr = k_smem.type.shape[2]
    ROWS: gl.constexpr = q_smem.type.shape[1]
    LAG: gl.constexpr = STAGES - 2
    REC: gl.constexpr = 2 * WINDOW + 1
    gl.static_assert(k_smem.dtype.primitive_bitwidth == 16, "the copy layout moves 8 two-byte elements per copy")
    tpw_cols: gl.constexpr = HEAD_DIM // 8  # 8 elements (16 bytes) per thread and copy
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // tpw_cols, tpw_cols], [4, 1], [1, 0])
    if n_kv > 0:
        _gather_q(q_smem.index(0), q_base, stride_qs, perm_base, q0, q1, layout)
        if q1 - q0 > ROWS:  # the second consumer has rows (otherwise it never reads its Q half)
            _gather_q(q_smem.index(1), q_base, stride_qs, perm_base, q0 + ROWS, q1, layout)
        async_commit_group()
    for j in range(n_kv):
        stage = j % STAGES
        phase = (j // STAGES) & 1
        rec = recs + gl.where(j < n_full, j, j + rec_shift) * REC
        mbarrier.wait(k_empty.index(stage), phase ^ 1)
        _gather_keys(k_smem.index(stage), k_base, rec, layout, WINDOW)
        async_commit_group()
        if j >= LAG:  # K_{j-LAG} is followed by 2 * LAG newer groups
            async_wait_group(2 * LAG)
            fence_async_shared()  # the copies are read by wgmma (async proxy)
            cta_barrier()  # every producer thread's copies have landed
            mbarrier.arrive(k_ready.index((j - LAG) % STAGES), count=1)
            if j > LAG:
                mbarrier.arrive(v_ready.index((j - LAG - 1) % STAGES), count=1)
        mbarrier.wait(v_empty.index(stage), phase ^ 1)
        _gather_keys(v_smem.index(stage), v_base, rec, layout, WINDOW)
        async_commit_group()
    async_wait_group(0)
    fence_async_shared()
    cta_barrier()
    for j in range(gl.maximum(n_kv - LAG, 0), n_kv):
        mbarrier.arrive(k_ready.index(j % STAGES), count=1)
    for j in range(gl.maximum(n_kv - LAG - 1, 0), n_kv):
        mbarrier.arrive(v_ready.index(j % STAGES), count=1)


@gluon.jit
def _softmax_step(s, m_i, l_i, width, qk_scale, s_layout: gl.constexpr, RAGGED: gl.constexpr):
    """Fold the scores ``s * qk_scale`` (``qk_scale >= 0``) of a key tile into the running max/sum; ``RAGGED``:
    only its first ``width`` columns are keys. Returns (p, m, l, alpha)."""
    if RAGGED:  # scale before masking: 0 * -inf would be NaN
        cols = gl.arange(0, s.type.shape[1], layout=gl.SliceLayout(0, s_layout))
        s = gl.where((cols < width)[None, :], s * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        p = gl.exp2(s - m_new[:, None])
    else:
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        p = gl.exp2(s * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, m_new, l_i, alpha


@gluon.jit
def _tile_width(recs, j, rec_shift, REC: gl.constexpr, RAGGED: gl.constexpr):
    """Columns of partial key tile ``j`` (record ``j + rec_shift``); full tiles: unused (0)."""
    if RAGGED:
        rec = recs + (j + rec_shift) * REC
        return gl.load(rec + 1) - gl.load(rec)
    else:
        return 0


@gluon.jit
def _walk(q, acc, m_i, l_i, j_lo, j_hi, turn0, pingpong, ring, HALF: gl.constexpr, RAGGED: gl.constexpr,
          WINDOW: gl.constexpr):
    """Fold key tiles ``j_lo .. j_hi`` (> j_lo) of the row into ``(acc, m_i, l_i)``: full tiles, or (``RAGGED``)
    partial ones, masked. ``S_j = Q K_j^T`` is issued before ``O += P_{j-1} V_{j-1}``; matrix-product issue
    ``t`` of this walk is turn ``turn0 + t``."""
    (k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, recs, rec_shift, qk_scale) = ring
    STAGES: gl.constexpr = k_smem.type.shape[0]
    BLOCK_N: gl.constexpr = k_smem.type.shape[1]
    ROWS: gl.constexpr = q.type.shape[0]
    REC: gl.constexpr = 2 * WINDOW + 1
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = acc.type.layout
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    s_init = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    m_i = gl.convert_layout(m_i, gl.SliceLayout(1, s_layout))
    l_i = gl.convert_layout(l_i, gl.SliceLayout(1, s_layout))

    stage = j_lo % STAGES
    width = _tile_width(recs, j_lo, rec_shift, REC, RAGGED)
    mbarrier.wait(k_ready.index(stage), (j_lo // STAGES) & 1)
    wait_turn(turn, HALF, turn0, pingpong)
    s_tok = warpgroup_mma(q, k_smem.index(stage).permute((1, 0)), s_init, use_acc=False, is_async=True)
    give_turn(turn, HALF, pingpong)
    s = warpgroup_mma_wait(0, deps=(s_tok, ))
    mbarrier.arrive(k_empty.index(stage), count=1)
    p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, width, qk_scale, s_layout, RAGGED)
    acc = acc * gl.convert_layout(alpha, row_o)[:, None]
    for j in range(j_lo + 1, j_hi):
        prev = stage
        stage = j % STAGES
        prev_v = v_smem.index(prev)
        mbarrier.wait(k_ready.index(stage), (j // STAGES) & 1)
        mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
        p_op = gl.convert_layout(p.to(v_smem.dtype), p_layout)
        wait_turn(turn, HALF, turn0 + j - j_lo, pingpong)
        s_tok = warpgroup_mma(q, k_smem.index(stage).permute((1, 0)), s_init, use_acc=False, is_async=True)
        pv_tok = warpgroup_mma(p_op, prev_v, acc, is_async=True)
        give_turn(turn, HALF, pingpong)
        width = _tile_width(recs, j, rec_shift, REC, RAGGED)  # read while the products run
        s = warpgroup_mma_wait(1, deps=(s_tok, ))
        mbarrier.arrive(k_empty.index(stage), count=1)
        p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, width, qk_scale, s_layout, RAGGED)
        pv = warpgroup_mma_wait(0, deps=(pv_tok, ))
        mbarrier.arrive(v_empty.index(prev), count=1)
        acc = pv * gl.convert_layout(alpha, row_o)[:, None]
    v_buf = v_smem.index(stage)
    mbarrier.wait(v_ready.index(stage), ((j_hi - 1) // STAGES) & 1)
    p_op = gl.convert_layout(p.to(v_smem.dtype), p_layout)
    wait_turn(turn, HALF, turn0 + j_hi - j_lo, pingpong)
    pv_tok = warpgroup_mma(p_op, v_buf, acc, is_async=True)
    give_turn(turn, HALF, pingpong)
    acc = warpgroup_mma_wait(0, deps=(pv_tok, ))
    mbarrier.arrive(v_empty.index(stage), count=1)
    return acc, gl.convert_layout(m_i, row_o), gl.convert_layout(l_i, row_o)


@gluon.jit
def _consume(args, HALF: gl.constexpr, WINDOW: gl.constexpr):
    (q_smem, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, recs, n_full, n_kv, rec_shift, q0, q1,
     perm_base, o_base, stride_os, lse_base, qk_scale) = args
    HEAD_DIM: gl.constexpr = k_smem.type.shape[2]
    ROWS: gl.constexpr = q_smem.type.shape[1]
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    r0 = q0 + HALF * ROWS
    pingpong = q1 - q0 > ROWS
    m_i = gl.full([ROWS], float("-inf"), gl.float32, row_o)
    l_i = gl.full([ROWS], 0.0, gl.float32, row_o)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
    if r0 >= q1:  # no rows of this tile here (so no turns either): only keep the ring moving
        pass_ring(k_ready, k_empty, v_ready, v_empty, n_kv)
    elif n_kv > 0:
        q = q_smem.index(HALF)  # landed with tile 0's K (its k_ready, waited for first)
        ring = (k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, recs, rec_shift, qk_scale)
        if n_full > 0:
            acc, m_i, l_i = _walk(q, acc, m_i, l_i, 0, n_full, 0, pingpong, ring, HALF, False, WINDOW)
        if n_kv > n_full:  # n_full + 1 turns were taken above
            turn0 = gl.where(n_full > 0, n_full + 1, 0)
            acc, m_i, l_i = _walk(q, acc, m_i, l_i, n_full, n_kv, turn0, pingpong, ring, HALF, True, WINDOW)

    has_keys = l_i > 0.0
    l_safe = gl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    rows_o = r0 + gl.arange(0, ROWS, layout=row_o)
    row_ok = rows_o < q1
    tok = gl.load(perm_base + rows_o, mask=row_ok, other=0).to(gl.int64)
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    gl.store(o_base + tok[:, None] * stride_os + cols[None, :], out.to(o_base.dtype.element_ty), mask=row_ok[:, None])
    lse = gl.where(has_keys, (m_i + gl.log2(l_safe)) * LN2, float("-inf"))
    gl.store(lse_base + tok, lse, mask=row_ok)


@gluon.jit
def _consume_first_half(args, WINDOW: gl.constexpr):
    _consume(args, 0, WINDOW)


@gluon.jit
def _consume_second_half(args, WINDOW: gl.constexpr):
    _consume(args, 1, WINDOW)


@gluon.jit
def cluster_attn_fwd_hopper(
    Q, KP, VP, O, LSE, Q_PERM,
    stride_qb, stride_qs, stride_qh,
    stride_ob, stride_os, stride_oh,
    tile_row, tile_q0, tile_q1, key_tiles, key_count,
    qk_scale, seq_len, q_slots, key_slots,
    NUM_HEADS: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, WINDOW: gl.constexpr,
    STAGES: gl.constexpr, Q_LAYOUT: gl.constexpr, KV_LAYOUT: gl.constexpr, CONSUMER_REGS: gl.constexpr,
    PRODUCER_REGS: gl.constexpr,
):
    """Grid ``(q_slots, B * H)``: query tile slot ``program_id(0)`` of group ``program_id(1)``; ``num_warps`` must
    be 4 (the first consumer). Arguments as `cluster_attn.cluster_attn_fwd` (``qk_scale >= 0``, in log2 units),
    for bf16/fp16 Q/KP/VP/O with head dim 64 or 128 and query tiles of at most 128 rows; Q rows and strides
    16-byte aligned. ``Q_LAYOUT`` / ``KV_LAYOUT``: NVMMA shared layouts of ``[64, D]`` / ``[BLOCK_N, D]`` tiles."""
    pid_t = gl.program_id(0)
    g = gl.program_id(1).to(gl.int64)
    slot = g * q_slots + pid_t
    q0 = gl.load(tile_q0 + slot)
    q1 = gl.load(tile_q1 + slot)
    r = gl.load(tile_row + slot).to(gl.int64)
    n_full = gl.load(key_count + 2 * r)
    n_kv = gl.where(q0 < q1, n_full + gl.load(key_count + 2 * r + 1), 0)  # an empty slot walks no keys
    rec_shift = key_slots - n_kv  # partial tile j (>= n_full) sits in record slot j + rec_shift
    b = g // NUM_HEADS
    h = g % NUM_HEADS

    dtype: gl.constexpr = Q.dtype.element_ty
    q_smem = gl.allocate_shared_memory(dtype, [2, HALF_M, HEAD_DIM], Q_LAYOUT)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], KV_LAYOUT)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], KV_LAYOUT)
    k_ready, k_empty, v_ready, v_empty, turn = ring_barriers(STAGES)

    perm_base = Q_PERM + g * seq_len
    recs = key_tiles + r * key_slots * (2 * WINDOW + 1)
    ring = (q_smem, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, recs, n_full, n_kv, rec_shift,
            q0, q1, perm_base)
    o_base = O + b * stride_ob + h * stride_oh
    consumer_args = ring + (o_base, stride_os, LSE + g * seq_len, qk_scale)
    q_base = Q + b * stride_qb + h * stride_qh
    kv_offset = g * seq_len * HEAD_DIM
    producer_args = ring + (q_base, stride_qs, KP + kv_offset, VP + kv_offset)
    gl.warp_specialize([
        (_consume_first_half, (consumer_args, WINDOW)),
        (_consume_second_half, (consumer_args, WINDOW)),
        (_produce, (producer_args, WINDOW)),
    ], [4, 4], [CONSUMER_REGS, PRODUCER_REGS])
