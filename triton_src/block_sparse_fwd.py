"""Block-sparse FlashAttention forward kernel that reads the layout's key spans in place.

One program computes one query tile (``BLOCK_M`` rows whose keys are identical, see `schedule.py`)
for one (batch, head). It walks the tile's merged key spans straight out of K/V (no gathered copies):
for each span the full ``BLOCK_N`` tiles, addressed by the loop counter and never masked, then, in a
second pass, each span's ragged tail with a column mask. Online softmax in the exp2 domain, fp32
accumulators.

Tensors are ``[B, S, H, D]`` with any batch/sequence/head strides and a contiguous head dim. K/V are
read with plain pointer arithmetic or through on-device tensor descriptors (TMA on Hopper): ``USE_TMA``
picks; ``WARP_SPEC`` asks Triton to warp-specialise the full-tile loop. Grid:
``(max query tiles per layout head, B * H)``.
"""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # host side: folded into qk_scale
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _load_kv(ptr, desc, kv0, offs_n, offs_d, stride_s, kv_end,
             BLOCK_N: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows ``kv0 .. kv0 + BLOCK_N`` of one K or V head as a [BLOCK_N, HEAD_DIM] tile (rows from ``kv_end``
    on read as 0 when MASKED, so keys outside the layout never reach the output, even if they hold NaN)."""
    if USE_TMA:
        tile = desc.load([kv0, 0])
        if MASKED:
            tile = tl.where((kv0 + offs_n)[:, None] < kv_end, tile, 0.0)
    else:
        rows = kv0 + offs_n
        ptrs = ptr + rows[:, None].to(tl.int64) * stride_s + offs_d[None, :]
        if MASKED:
            tile = tl.load(ptrs, mask=(rows < kv_end)[:, None], other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _step(acc, m_i, l_i, q, k_ptr, v_ptr, k_desc, v_desc, kv0, kv_end, stride_ks, stride_vs, qk_scale,
          BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
          USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold key tile ``kv0 .. kv0 + BLOCK_N`` (columns from ``kv_end`` on masked when MASKED) into the softmax."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k = _load_kv(k_ptr, k_desc, kv0, offs_n, offs_d, stride_ks, kv_end, BLOCK_N, MASKED, USE_TMA)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASKED:  # scale before masking: 0 * -inf would be NaN
        qk = tl.where((kv0 + offs_n)[None, :] < kv_end, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
    else:  # scale the row max, then one fused multiply-add per score (qk_scale >= 0 keeps the max)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_kv(v_ptr, v_desc, kv0, offs_n, offs_d, stride_vs, kv_end, BLOCK_N, MASKED, USE_TMA)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attend_spans(acc, m_i, l_i, q, k_ptr, v_ptr, k_desc, v_desc, span_start, span_end, lo, hi,
                  stride_ks, stride_vs, qk_scale,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                  USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, WARP_SPEC: tl.constexpr):
    """Key spans ``lo .. hi``: each span's full tiles (addresses from the loop counter), then every tail."""
    for sp in range(lo, hi):
        s = tl.load(span_start + sp)
        full_end = s + ((tl.load(span_end + sp) - s) // BLOCK_N) * BLOCK_N
        for kv0 in tl.range(s, full_end, BLOCK_N, warp_specialize=WARP_SPEC):
            acc, m_i, l_i = _step(acc, m_i, l_i, q, k_ptr, v_ptr, k_desc, v_desc, kv0, kv0 + BLOCK_N,
                                  stride_ks, stride_vs, qk_scale, BLOCK_N, HEAD_DIM, False, USE_TMA, DOT_PRECISION)
    for sp in range(lo, hi):
        s = tl.load(span_start + sp)
        e = tl.load(span_end + sp)
        t0 = s + ((e - s) // BLOCK_N) * BLOCK_N
        if t0 < e:
            acc, m_i, l_i = _step(acc, m_i, l_i, q, k_ptr, v_ptr, k_desc, v_desc, t0, e,
                                  stride_ks, stride_vs, qk_scale, BLOCK_N, HEAD_DIM, True, USE_TMA, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def block_sparse_attn_fwd(
    Q, K, V, O, LSE,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    tile_ptr, tile_start, tile_end, tile_row,
    span_ptr, span_start, span_end,
    qk_scale, q_len, kv_len,
    NUM_HEADS: tl.constexpr, KV_GROUP: tl.constexpr, PER_HEAD_LAYOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, WARP_SPEC: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // NUM_HEADS
    h = pid_bh % NUM_HEADS
    h_kv = h // KV_GROUP
    lh = h if PER_HEAD_LAYOUT else 0
    t_lo = tl.load(tile_ptr + lh)
    if pid_t >= tl.load(tile_ptr + lh + 1) - t_lo:
        return
    t = t_lo + pid_t
    q0 = tl.load(tile_start + t)
    q1 = tl.load(tile_end + t)
    row = tl.load(tile_row + t)

    offs_m = q0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q1
    b64 = b.to(tl.int64)
    q_ptrs = Q + b64 * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    if qk_scale < 0:  # softmax(q k * s) = softmax(-q k * |s|): keep qk_scale >= 0 for `_step`
        q = -q
        qk_scale = -qk_scale

    k_ptr = K + b64 * stride_kb + h_kv * stride_kh
    v_ptr = V + b64 * stride_vb + h_kv * stride_vh
    if USE_TMA:
        k_desc = tl.make_tensor_descriptor(k_ptr, shape=[kv_len, HEAD_DIM], strides=[stride_ks, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(v_ptr, shape=[kv_len, HEAD_DIM], strides=[stride_vs, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
    else:
        k_desc = k_ptr
        v_desc = v_ptr

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, m_i, l_i = _attend_spans(acc, m_i, l_i, q, k_ptr, v_ptr, k_desc, v_desc, span_start, span_end,
                                  tl.load(span_ptr + row), tl.load(span_ptr + row + 1), stride_ks, stride_vs,
                                  qk_scale, BLOCK_N, HEAD_DIM, USE_TMA, DOT_PRECISION, WARP_SPEC)

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    o_ptrs = O + b64 * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_os + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    lse = tl.where(has_keys, (m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0))) * LN2, float("-inf"))
    lse_ptrs = LSE + (b64 * NUM_HEADS + h) * q_len + offs_m
    tl.store(lse_ptrs, lse, mask=row_ok)
