"""Block-sparse FlashAttention backward kernels (FA2 recomputation) reading the layout's spans in place.

Given the forward's ``out`` and ``lse``, softmax probabilities are recomputed tile by tile,
``P = exp(scale * Q K^T - lse)``, never stored. With ``dP = dO V^T`` and ``Delta = rowsum(dO * O)`` (minus the
lse's own gradient, see `bwd_preprocess`), ``dS = P * (dP - Delta)``:

* ``dV = P^T dO`` and ``dK = scale * dS^T Q``: `block_sparse_attn_bwd_dkdv`, one program per key tile of the
  layout's *transpose* (key rows whose query spans are identical, see `schedule.build_key_schedule`), walking the
  query spans that attend it; with GQA one program sums its key head's group of query heads;
* ``dQ = scale * dS K``: `block_sparse_attn_bwd_dq`, one program per query tile of the forward schedule, walking
  its key spans like the forward kernel.

Each output element is written by exactly one program (no atomics, deterministic), except in the dK/dV kernel's
opt-in ACCUMULATE_DQ variant (the single pass), which adds dQ with integer atomics instead of a dQ kernel: each
row's sum is kept in int64 multiples of a power of two chosen from a bound on it (`dq_unit`), so it is exact and
the same in any order (deterministic too). Scores live in the exp2
domain (``qk_scale = scale * log2(e)``), accumulators in fp32; any finite scale sign works (no running max).
Tensors are ``[B, S, H, D]`` with any batch/sequence/head strides and a contiguous head dim; ``LSE`` and
``DELTA`` are contiguous ``[B, H, Sq]`` float32. Both kernels walk every span's full steps first (no masks) and
every ragged tail after; ``USE_TMA`` reads the walked rows (dK/dV: q and dO; dQ: K and V) through on-device
tensor descriptors (Hopper TMA; 16-byte aligned rows and bases), zeroing rows past a tail's end.
"""
import triton
import triton.language as tl

from .block_sparse_fwd import load_rows

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def bwd_preprocess(O, DO, DLSE, DELTA, KEY_BOUND, DQ_UNIT, stride_ob, stride_os, stride_oh, stride_dob, stride_dos,
                   stride_doh, q_len, kv_len, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                   HAS_DLSE: tl.constexpr, HAS_UNIT: tl.constexpr):
    """``DELTA[b, h, s] = sum_d O * dO - dLSE`` (fp32): the lse gradient enters dS exactly like ``-Delta``.
    HAS_UNIT: also ``DQ_UNIT[b, h, s]``, the power of two that one unit of the single pass's int64 dQ sum stands
    for (`dq_unit`), from ``KEY_BOUND [B, H, 2]`` = (``max |K|``, ``max_j ||V_j||``) over the keys query head
    ``h`` attends. Grid ``(cdiv(q_len, BLOCK_M), B * H)``."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // NUM_HEADS).to(tl.int64)
    h = pid_bh % NUM_HEADS
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q_len
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(O + b * stride_ob + h * stride_oh + rows * stride_os + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows * stride_dos + offs_d[None, :], mask=row_ok[:, None],
                 other=0.0).to(tl.float32)
    delta = tl.sum(o.to(tl.float32) * do, 1)
    lse_offs = (b * NUM_HEADS + h) * q_len + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + lse_offs, mask=row_ok, other=0.0)
    tl.store(DELTA + lse_offs, delta, mask=row_ok)
    if HAS_UNIT:
        kb = KEY_BOUND + (b * NUM_HEADS + h) * 2
        bound = tl.load(kb) * (tl.sqrt(tl.sum(do * do, 1)) * tl.load(kb + 1) + tl.abs(delta)) * kv_len
        tl.store(DQ_UNIT + lse_offs, dq_unit(bound), mask=row_ok)


@triton.jit
def dq_unit(bound):
    """The single pass sums a row's ``dS K`` (dQ before the softmax scale) as int64 multiples of ``unit =
    2^(e - 61)``, a power of two with ``2^(e - 1) <= bound < 2^e``. ``bound = kv_len max|K| (||dO_i||
    max_j ||V_j|| + |Delta_i|)`` caps every partial sum over keys: ``|sum_j dS_ij K_jd| <= max|K| sum_j P_ij
    |dP_ij - Delta_i|``, with ``|dP_ij| <= ||dO_i|| ||V_j||`` and every ``P_ij <= 1`` (the single pass clamps the
    recomputed P to 1; exactly, P even sums to 1, so ``kv_len`` is headroom for scores whose float32 rounding
    differs between the forward and the backward). So every partial sum stays within ``2^61`` units (int64
    holds ``2^63``), integer addition makes the sum exact in any order (deterministic), and each key tile's share
    loses only its own fp32 rounding plus less than a unit (``2^-60 kv_len`` of the bound). ``e`` comes off the
    float's exponent field (no log), at least -65 so that ``unit`` and ``1 / unit`` are normal floats. A bound
    that is not finite gives unit NaN, so the row's dQ comes out NaN (see `backward_launch.launch_backward`)."""
    field = (bound.to(tl.int32, bitcast=True) >> 23) & 0xFF
    unit = ((tl.maximum(field - 126, -65) + 66) << 23).to(tl.float32, bitcast=True)
    return tl.where(field == 0xFF, float("nan"), unit)


@triton.jit
def _walked_rows(a_ptr, b_ptr, n_rows, stride_a, stride_b, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                 USE_TMA: tl.constexpr):
    """What `load_rows` reads two ``[n_rows, HEAD_DIM]`` heads through: tensor descriptors of ``BLOCK``-row boxes
    when USE_TMA, else the pointers themselves."""
    a, b = a_ptr, b_ptr
    if USE_TMA:
        a = tl.make_tensor_descriptor(a_ptr, shape=[n_rows, HEAD_DIM], strides=[stride_a, 1],
                                      block_shape=[BLOCK, HEAD_DIM])
        b = tl.make_tensor_descriptor(b_ptr, shape=[n_rows, HEAD_DIM], strides=[stride_b, 1],
                                      block_shape=[BLOCK, HEAD_DIM])
    return a, b


@triton.jit
def _dq_step(dq, q, do, lse2, delta, k_ptr, v_ptr, k_desc, v_desc, kv0, kv_end, stride_ks, stride_vs, qk_scale,
             BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr,
             DOT_PRECISION: tl.constexpr):
    """Add key tile ``kv0 .. kv0 + BLOCK_N`` (columns from ``kv_end`` on left out when MASKED) to ``dq`` (unscaled)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k = load_rows(k_ptr, k_desc, kv0, offs_n, offs_d, stride_ks, kv_end, BLOCK_N, MASKED, USE_TMA)
    v = load_rows(v_ptr, v_desc, kv0, offs_n, offs_d, stride_vs, kv_end, BLOCK_N, MASKED, USE_TMA)
    p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse2[:, None])
    if MASKED:
        p = tl.where((kv0 + offs_n)[None, :] < kv_end, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)


@triton.jit
def block_sparse_attn_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    tile_ptr, tile_start, tile_end, tile_row,
    span_ptr, span_start, span_end,
    sm_scale, q_len, kv_len,
    NUM_HEADS: tl.constexpr, KV_GROUP: tl.constexpr, PER_HEAD_LAYOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dQ of one query tile (the forward's schedule) of one (batch, head). Grid ``(max query tiles, B * H)``.
    Rows of a tile without keys get dQ = 0."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // NUM_HEADS).to(tl.int64)
    h = pid_bh % NUM_HEADS
    lh = h if PER_HEAD_LAYOUT else 0
    t_lo = tl.load(tile_ptr + lh)
    if pid_t >= tl.load(tile_ptr + lh + 1) - t_lo:
        return
    t = t_lo + pid_t
    q1 = tl.load(tile_end + t)
    row = tl.load(tile_row + t)
    offs_m = tl.load(tile_start + t) + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q1
    rows = offs_m[:, None].to(tl.int64)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows * stride_qs + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows * stride_dos + offs_d[None, :], mask=row_ok[:, None],
                 other=0.0)
    lse_offs = (b * NUM_HEADS + h) * q_len + offs_m
    lse2 = tl.load(LSE + lse_offs, mask=row_ok, other=float("inf")) * LOG2E  # padding rows: P = 0
    delta = tl.load(DELTA + lse_offs, mask=row_ok, other=0.0)
    qk_scale = sm_scale * LOG2E
    h_kv = h // KV_GROUP
    k_ptr = K + b * stride_kb + h_kv * stride_kh
    v_ptr = V + b * stride_vb + h_kv * stride_vh
    k_desc, v_desc = _walked_rows(k_ptr, v_ptr, kv_len, stride_ks, stride_vs, BLOCK_N, HEAD_DIM, USE_TMA)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo = tl.load(span_ptr + row)
    hi = tl.load(span_ptr + row + 1)
    for sp in range(lo, hi):  # every span's full tiles (no masks), then every ragged tail
        s = tl.load(span_start + sp)
        full_end = s + ((tl.load(span_end + sp) - s) // BLOCK_N) * BLOCK_N
        for kv0 in range(s, full_end, BLOCK_N):
            dq = _dq_step(dq, q, do, lse2, delta, k_ptr, v_ptr, k_desc, v_desc, kv0, kv0 + BLOCK_N, stride_ks,
                          stride_vs, qk_scale, BLOCK_N, HEAD_DIM, False, USE_TMA, DOT_PRECISION)
    for sp in range(lo, hi):
        s = tl.load(span_start + sp)
        e = tl.load(span_end + sp)
        full_end = s + ((e - s) // BLOCK_N) * BLOCK_N
        if full_end < e:
            dq = _dq_step(dq, q, do, lse2, delta, k_ptr, v_ptr, k_desc, v_desc, full_end, e, stride_ks, stride_vs,
                          qk_scale, BLOCK_N, HEAD_DIM, True, USE_TMA, DOT_PRECISION)
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + rows * stride_dqs + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dkdv_step(dk, dv, k, v, key_ok, q_ptr, q_desc, do_ptr, do_desc, lse_ptr, delta_ptr, unit_ptr, acc_ptr, q0,
               q_end, stride_qs, stride_dos, stride_as, qk_scale, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
               MASKED: tl.constexpr, USE_TMA: tl.constexpr, ACCUMULATE_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add query rows ``q0 .. q0 + BLOCK_M`` of one head (rows from ``q_end`` on left out when MASKED) to the key
    tile's ``dk`` (unscaled) and ``dv``; everything is transposed (keys are rows). ACCUMULATE_DQ: also add these
    rows' ``dS K`` (unscaled), in int64 multiples of their row's `dq_unit` at ``unit_ptr``, to the dQ sum at
    ``acc_ptr`` (integer atomics: exact, so the order does not matter)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = load_rows(q_ptr, q_desc, q0, offs_m, offs_d, stride_qs, q_end, BLOCK_M, MASKED, USE_TMA)
    do = load_rows(do_ptr, do_desc, q0, offs_m, offs_d, stride_dos, q_end, BLOCK_M, MASKED, USE_TMA)
    if MASKED:
        row_ok = q0 + offs_m < q_end
        lse2 = tl.load(lse_ptr + q0 + offs_m, mask=row_ok, other=float("inf")) * LOG2E  # padding rows: P = 0
        delta = tl.load(delta_ptr + q0 + offs_m, mask=row_ok, other=0.0)
    else:
        lse2 = tl.load(lse_ptr + q0 + offs_m) * LOG2E
        delta = tl.load(delta_ptr + q0 + offs_m)
    # padding keys of a short tile (zero rows of k, v) only reach their own dk/dv rows, which are never stored
    pt = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale - lse2[None, :])
    if ACCUMULATE_DQ:  # P <= 1 holds the single pass's bound (`dq_unit`) even where rounding overshoots it
        pt = tl.minimum(pt, 1.0, propagate_nan=tl.PropagateNan.ALL)
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    dst = pt * (dpt - delta[None, :])
    dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    if ACCUMULATE_DQ:  # dQ sums over keys: a short tile's padding keys (whose dS may be inf) must not enter it
        ds = tl.trans(tl.where(key_ok[:, None], dst, 0.0).to(k.dtype))
        if MASKED:
            per_unit = 1.0 / tl.load(unit_ptr + q0 + offs_m, mask=row_ok, other=1.0)
        else:
            per_unit = 1.0 / tl.load(unit_ptr + q0 + offs_m)
        # |units| < 2^61 (`dq_unit`; exact scaling); a non-finite share converts to anything, but comes only from
        # non-finite inputs or fp16 overflow (see `backward_launch.launch_backward`)
        units = (tl.dot(ds, k, input_precision=DOT_PRECISION) * per_unit[:, None]).to(tl.int64)
        acc_ptrs = acc_ptr + (q0 + offs_m)[:, None].to(tl.int64) * stride_as + offs_d[None, :]
        if MASKED:
            tl.atomic_add(acc_ptrs, units, mask=row_ok[:, None], sem="relaxed")
        else:
            tl.atomic_add(acc_ptrs, units, sem="relaxed")
    return dk, dv


@triton.jit
def block_sparse_attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, DQ_UNIT, DQ_ACC,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    stride_ab, stride_as, stride_ah,
    tile_ptr, tile_start, tile_end, tile_row,
    span_ptr, span_start, span_end,
    sm_scale, q_len,
    NUM_HEADS: tl.constexpr, KV_GROUP: tl.constexpr, PER_HEAD_LAYOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
    ACCUMULATE_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dK, dV of one key tile (the transpose's schedule: ``tile_*`` are key rows, spans are query tokens).
    ACCUMULATE_DQ: also adds each pair's dQ share to ``DQ_ACC [B, Sq, H, D]`` int64 with atomics, in multiples
    of its row's ``DQ_UNIT [B, H, Sq]`` (`dq_unit`): the single pass of FlashAttention-2 and -3, so no dQ kernel has
    to recompute the scores, but deterministic, since integer sums do not depend on the order.

    Shared layout: grid ``(max key tiles, B * H_kv)``, one program sums the ``KV_GROUP`` query heads of its key
    head and writes ``DK/DV [B, Skv, H_kv, D]``. Per-head layout: grid ``(max key tiles of a head, B * H)``, one
    query head each, written to ``DK/DV [B, Skv, H, D]`` (the host sums GQA groups). Keys no query attends get 0.
    """
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    OUT_HEADS: tl.constexpr = NUM_HEADS if PER_HEAD_LAYOUT else NUM_HEADS // KV_GROUP
    HEADS_PER_PROGRAM: tl.constexpr = 1 if PER_HEAD_LAYOUT else KV_GROUP
    b = (pid_bh // OUT_HEADS).to(tl.int64)
    oh = pid_bh % OUT_HEADS
    lh = oh if PER_HEAD_LAYOUT else 0
    h_kv = oh // KV_GROUP if PER_HEAD_LAYOUT else oh
    t_lo = tl.load(tile_ptr + lh)
    if pid_t >= tl.load(tile_ptr + lh + 1) - t_lo:
        return
    t = t_lo + pid_t
    k1 = tl.load(tile_end + t)
    row = tl.load(tile_row + t)
    offs_n = tl.load(tile_start + t) + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < k1
    keys = offs_n[:, None].to(tl.int64)
    k = tl.load(K + b * stride_kb + h_kv * stride_kh + keys * stride_ks + offs_d[None, :], mask=key_ok[:, None],
                other=0.0)
    v = tl.load(V + b * stride_vb + h_kv * stride_vh + keys * stride_vs + offs_d[None, :], mask=key_ok[:, None],
                other=0.0)
    qk_scale = sm_scale * LOG2E

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo = tl.load(span_ptr + row)
    hi = tl.load(span_ptr + row + 1)
    for g in range(HEADS_PER_PROGRAM):
        h = oh if PER_HEAD_LAYOUT else oh * KV_GROUP + g
        q_ptr = Q + b * stride_qb + h * stride_qh
        do_ptr = DO + b * stride_dob + h * stride_doh
        lse_ptr = LSE + (b * NUM_HEADS + h) * q_len
        delta_ptr = DELTA + (b * NUM_HEADS + h) * q_len
        unit_ptr = DQ_UNIT + (b * NUM_HEADS + h) * q_len
        acc_ptr = DQ_ACC + b * stride_ab + h * stride_ah
        q_desc, do_desc = _walked_rows(q_ptr, do_ptr, q_len, stride_qs, stride_dos, BLOCK_M, HEAD_DIM, USE_TMA)
        for sp in range(lo, hi):  # every span's full query steps (no masks), then every ragged tail
            s = tl.load(span_start + sp)
            full_end = s + ((tl.load(span_end + sp) - s) // BLOCK_M) * BLOCK_M
            for q0 in range(s, full_end, BLOCK_M):
                dk, dv = _dkdv_step(dk, dv, k, v, key_ok, q_ptr, q_desc, do_ptr, do_desc, lse_ptr, delta_ptr,
                                    unit_ptr, acc_ptr, q0, q0 + BLOCK_M, stride_qs, stride_dos, stride_as, qk_scale,
                                    BLOCK_M, HEAD_DIM, False, USE_TMA, ACCUMULATE_DQ, DOT_PRECISION)
        for sp in range(lo, hi):
            s = tl.load(span_start + sp)
            e = tl.load(span_end + sp)
            full_end = s + ((e - s) // BLOCK_M) * BLOCK_M
            if full_end < e:
                dk, dv = _dkdv_step(dk, dv, k, v, key_ok, q_ptr, q_desc, do_ptr, do_desc, lse_ptr, delta_ptr,
                                    unit_ptr, acc_ptr, full_end, e, stride_qs, stride_dos, stride_as, qk_scale,
                                    BLOCK_M, HEAD_DIM, True, USE_TMA, ACCUMULATE_DQ, DOT_PRECISION)
    dk_ptrs = DK + b * stride_dkb + oh * stride_dkh + keys * stride_dks + offs_d[None, :]
    dv_ptrs = DV + b * stride_dvb + oh * stride_dvh + keys * stride_dvs + offs_d[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=key_ok[:, None])
