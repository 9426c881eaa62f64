"""Block-sparse FlashAttention forward kernel that reads the layout's key spans in place.

One program computes one query tile (``BLOCK_M`` rows whose keys are identical, see `schedule.py`)
for one (batch, head). It walks the tile's merged key spans straight out of K/V (no gathered copies):
for each span the full ``BLOCK_N`` tiles, addressed by the loop counter and never masked, then, in a
second pass, each span's ragged tail with a column mask. Online softmax in the exp2 domain, fp32
accumulators.

8-bit modes (``QK_INT8``, ``FP8_PV``; see `fp8_quant.py` for the pre-pass): the same walk with Q quantized
to INT8 per query tile here (its scale folded into the softmax scale), K read as smoothed INT8 with one
scale per aligned 128-token block (`KEY_QUANT_BLOCK`; a tile may straddle two blocks), and with
``FP8_PV`` P in e4m3 (fixed scale 448) times V^T in e4m3 (per-channel scales applied to the output).
``QK_INT8`` alone keeps P @ V in the input dtype.

Tensors are ``[B, S, H, D]`` with any batch/sequence/head strides and a contiguous head dim. K/V are
read with plain pointer arithmetic or through on-device tensor descriptors (TMA on Hopper): ``USE_TMA``
picks; ``WARP_SPEC`` asks Triton to warp-specialise the full-tile loop. Grid:
``(max query tiles per layout head, B * H)``.
"""
import triton
import triton.language as tl

from .fp8_quant import KEY_QUANT_BLOCK, quantize_q_tile, to_e4m3

LOG2E = 1.4426950408889634  # host side: folded into qk_scale
LN2 = tl.constexpr(0.6931471805599453)
P_SCALE = tl.constexpr(448.0)  # P <= 1 against the running max: 1 maps onto e4m3's largest finite value
KQ_BLOCK = tl.constexpr(KEY_QUANT_BLOCK)  # tokens per K scale


@triton.jit
def load_rows(ptr, desc, kv0, offs_n, offs_d, stride_s, kv_end,
             BLOCK_N: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows ``kv0 .. kv0 + BLOCK_N`` of one head of a ``[S, HEAD_DIM]`` tensor (K, V; the backward's Q, dO) as a
    tile, through ``desc`` when USE_TMA (rows from ``kv_end`` on read as 0 when MASKED, so rows outside the
    layout never reach the result, even if they hold NaN)."""
    if USE_TMA:
        tile = desc.load([kv0, 0])
        if MASKED:
            tile = tl.where((kv0 + offs_n)[:, None] < kv_end, tile, tl.zeros_like(tile))
    else:
        rows = kv0 + offs_n
        ptrs = ptr + rows[:, None].to(tl.int64) * stride_s + offs_d[None, :]
        if MASKED:
            tile = tl.load(ptrs, mask=(rows < kv_end)[:, None], other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _load_vt(ptr, desc, kv0, offs_n, offs_d, stride_d, kv_end,
             MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """Columns ``kv0 .. kv0 + BLOCK_N`` of one transposed e4m3 V head ``[HEAD_DIM, S]`` (tokens contiguous);
    columns from ``kv_end`` on read as 0 when MASKED."""
    if USE_TMA:
        tile = desc.load([0, kv0])
        if MASKED:
            tile = tl.where((kv0 + offs_n)[None, :] < kv_end, tile, tl.zeros_like(tile))
    else:
        cols = kv0 + offs_n
        ptrs = ptr + offs_d[:, None].to(tl.int64) * stride_d + cols[None, :]
        if MASKED:
            tile = tl.load(ptrs, mask=(cols < kv_end)[None, :], other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _step(acc, m_i, l_i, q, k_ptr, v_ptr, k_desc, v_desc, ks_ptr, kv0, kv_end, stride_ks, stride_vs, qk_scale,
          BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
          USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
          QK_INT8: tl.constexpr, FP8_PV: tl.constexpr, INTERPRETED: tl.constexpr):
    """Fold key tile ``kv0 .. kv0 + BLOCK_N`` (columns from ``kv_end`` on masked when MASKED) into the softmax.

    QK_INT8: q, k are INT8 and ``ks_ptr`` holds the head's k scales, one per `KQ_BLOCK` tokens; FP8_PV:
    ``v_ptr`` / ``v_desc`` address V^T in e4m3 and ``stride_vs`` is its channel stride."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k = load_rows(k_ptr, k_desc, kv0, offs_n, offs_d, stride_ks, kv_end, BLOCK_N, MASKED, USE_TMA)
    if QK_INT8:  # exact int32 dot products, then each key's block scale
        qk = tl.dot(q, tl.trans(k)).to(tl.float32)
        blocks = (kv0 + offs_n) // KQ_BLOCK
        if MASKED:
            qk = qk * tl.load(ks_ptr + blocks, mask=kv0 + offs_n < kv_end, other=0.0)[None, :]
        else:
            qk = qk * tl.load(ks_ptr + blocks)[None, :]
    else:
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
    if FP8_PV:  # a fresh fp32 product per tile: FP8 MMAs accumulate their own operand C imprecisely
        vt = _load_vt(v_ptr, v_desc, kv0, offs_n, offs_d, stride_vs, kv_end, MASKED, USE_TMA)
        acc = acc * alpha[:, None] + tl.dot(to_e4m3(p * P_SCALE, INTERPRETED), tl.trans(vt))
    else:
        v = load_rows(v_ptr, v_desc, kv0, offs_n, offs_d, stride_vs, kv_end, BLOCK_N, MASKED, USE_TMA)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attend_spans(acc, m_i, l_i, q, k_ptr, v_ptr, k_desc, v_desc, ks_ptr, span_start, span_end, lo, hi,
                  stride_ks, stride_vs, qk_scale,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                  USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, WARP_SPEC: tl.constexpr,
                  QK_INT8: tl.constexpr, FP8_PV: tl.constexpr, INTERPRETED: tl.constexpr):
    """Key spans ``lo .. hi``: each span's full tiles (addresses from the loop counter), then every tail."""
    for sp in range(lo, hi):
        s = tl.load(span_start + sp)
        full_end = s + ((tl.load(span_end + sp) - s) // BLOCK_N) * BLOCK_N
        for kv0 in tl.range(s, full_end, BLOCK_N, warp_specialize=WARP_SPEC):
            acc, m_i, l_i = _step(acc, m_i, l_i, q, k_ptr, v_ptr, k_desc, v_desc, ks_ptr, kv0, kv0 + BLOCK_N,
                                  stride_ks, stride_vs, qk_scale, BLOCK_N, HEAD_DIM, False, USE_TMA, DOT_PRECISION,
                                  QK_INT8, FP8_PV, INTERPRETED)
    for sp in range(lo, hi):
        s = tl.load(span_start + sp)
        e = tl.load(span_end + sp)
        t0 = s + ((e - s) // BLOCK_N) * BLOCK_N
        if t0 < e:
            acc, m_i, l_i = _step(acc, m_i, l_i, q, k_ptr, v_ptr, k_desc, v_desc, ks_ptr, t0, e,
                                  stride_ks, stride_vs, qk_scale, BLOCK_N, HEAD_DIM, True, USE_TMA, DOT_PRECISION,
                                  QK_INT8, FP8_PV, INTERPRETED)
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
    K_SCALE, K_MEAN, V_SCALE,
    NUM_HEADS: tl.constexpr, KV_GROUP: tl.constexpr, PER_HEAD_LAYOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, WARP_SPEC: tl.constexpr,
    QK_INT8: tl.constexpr = False, FP8_PV: tl.constexpr = False, INTERPRETED: tl.constexpr = False,
):
    """One query tile of one (batch, head). 8-bit modes: K is `quantize_kv`'s INT8 ``k8`` with ``K_SCALE
    [B, H_kv, ceil(kv_len / KQ_BLOCK)]`` and ``K_MEAN [B, H_kv, D]``; with FP8_PV, V is its ``vt8 [B, H_kv, D, S_pad]``
    (``stride_vs`` = channel stride) and ``V_SCALE [B, H_kv, D]``. Unused pointers may be any tensor."""
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
    bh_kv = b64 * (NUM_HEADS // KV_GROUP) + h_kv
    ks_ptr = K_SCALE + bh_kv * tl.cdiv(kv_len, KQ_BLOCK)
    walk_scale = qk_scale
    if QK_INT8:  # one scale per query tile, folded into the softmax scale
        q, q_tile_scale, q_mu = quantize_q_tile(q.to(tl.float32), tl.load(K_MEAN + bh_kv * HEAD_DIM + offs_d),
                                                INTERPRETED)
        walk_scale = qk_scale * q_tile_scale

    k_ptr = K + b64 * stride_kb + h_kv * stride_kh
    v_ptr = V + b64 * stride_vb + h_kv * stride_vh
    if USE_TMA:
        k_desc = tl.make_tensor_descriptor(k_ptr, shape=[kv_len, HEAD_DIM], strides=[stride_ks, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        if FP8_PV:
            v_desc = tl.make_tensor_descriptor(v_ptr, shape=[HEAD_DIM, kv_len], strides=[stride_vs, 1],
                                               block_shape=[HEAD_DIM, BLOCK_N])
        else:
            v_desc = tl.make_tensor_descriptor(v_ptr, shape=[kv_len, HEAD_DIM], strides=[stride_vs, 1],
                                               block_shape=[BLOCK_N, HEAD_DIM])
    else:
        k_desc = k_ptr
        v_desc = v_ptr

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, m_i, l_i = _attend_spans(acc, m_i, l_i, q, k_ptr, v_ptr, k_desc, v_desc, ks_ptr, span_start, span_end,
                                  tl.load(span_ptr + row), tl.load(span_ptr + row + 1), stride_ks, stride_vs,
                                  walk_scale, BLOCK_N, HEAD_DIM, USE_TMA, DOT_PRECISION, WARP_SPEC,
                                  QK_INT8, FP8_PV, INTERPRETED)

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if FP8_PV:
        out = out * (tl.load(V_SCALE + bh_kv * HEAD_DIM + offs_d) / P_SCALE)[None, :]
    if QK_INT8:
        m_i = m_i + q_mu * qk_scale
    o_ptrs = O + b64 * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_os + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    lse = tl.where(has_keys, (m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0))) * LN2, float("-inf"))
    lse_ptrs = LSE + (b64 * NUM_HEADS + h) * q_len + offs_m
    tl.store(lse_ptrs, lse, mask=row_ok)
