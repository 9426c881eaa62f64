"""Hopper (sm_90) block-sparse attention forward in Gluon, warp-specialised in the manner of FlashAttention-3.

Same inputs and schedule as the portable kernel (`block_sparse_fwd.py`; same results in exact mode, the 8-bit
modes walk the keys in another order, see `schedule.build_key_tiles`), for bf16/fp16 with head dim
64 or 128. One program computes one query tile of up to 128 rows (192 in one unmeasured fp8 variant, below;
rows that attend identical keys, see `schedule.py`) for one (batch, head), with three partitions that meet in
shared memory:

* loader (1 warp): TMA-loads the tile's 64-row parts of Q once, then every key tile of the tile's
  key list (``kv_tile_start/kv_tile_end``, see `schedule.build_key_tiles`) as a K tile and a V tile into a
  ``STAGES``-deep ring; ``*_ready`` barriers say a slot is filled, ``*_empty`` barriers (one arrival per
  consumer) that it may be refilled;
* two consumers (one warpgroup each, 64 query rows each; three in that variant): ``S = Q K^T`` on the tensor
  cores (wgmma, both operands in shared memory), online softmax in registers (exp2 domain, fp32), ``O += P V``
  with P from registers. The next tile's ``Q K^T`` is issued with the previous tile's ``P V``; ptxas waits for both
  before the softmax (overlapping it with ``P V`` would keep P and O's registers busy through it: where it
  compiles spill-free, fp8, the overlap measured 3-8% slower on an H100). The two consumers take turns
  issuing their matrix products (two ``turn`` barriers, FA3's ping-pong), so one warpgroup's softmax runs
  while the other's products occupy the tensor cores. fp8 takes no turns: its products are short next to its
  softmax, and the turns only made each consumer wait for the other.

Three fp8 variants wait for their first GPU measurement (`tuning.hopper_configs`' ``unmeasured``): folding the
full key tiles two per softmax step (``TILES_PER_STEP = 2``, `_attend_tile_pairs`: one product round trip,
one running-max update and one rescale of O per two tiles); query tiles of 192 rows with three consumers
(``CONSUMERS = 3``, 160 registers each, so ``P V`` completes before the next ``Q K^T`` is issued); and the row
sums of P from the tensor cores (``ROWSUM_MMA``: e4m3 P times a tile of ones, an N=8 product issued with
``P V``, in place of 64 additions per key tile and thread; the normaliser is then the sum of the rounded P
the output is made of).

Ragged key tiles (``kv_end - kv0`` below the tile's width) are the only masked ones: their scores are scaled
first, then columns from ``kv_end`` on are set to -inf, and the V rows from ``kv_end`` on are zeroed in shared memory
before ``P V`` (a TMA tile reads whatever follows the span, which may hold NaN). A row's *short* tiles (at most
``SHORT_N`` keys, e.g. the 24-key tail of a 1560-token frame) load only ``SHORT_N`` rows into the head of a
ring slot and run ``SHORT_N``-column products. Outside fp8 every piece of a span shorter than ``BLOCK_N`` is cut
into short tiles (`schedule.build_key_tiles`); fp8 keeps such pieces as ragged ``BLOCK_N``-wide tiles. Either
way a row's full tiles come first and its last ``row_kv_masked`` tiles are the masked ones, so the consumers
walk them in two loops: the full tiles without a mask (the mask's per-thread column indices would hold
registers for the whole walk: on Triton 3.9 that spilled, and a per-tile branch would keep a masked and an
unmasked softmax in the loop), then the masked tail. A consumer whose 64 rows all lie past the tile's end
only walks the barriers. Rows without keys write 0 and lse = -inf.

8-bit modes (``precision="int8_qk"`` / ``"fp8"``, see `fp8_quant.py`) follow the tensors' dtypes: INT8 Q
(quantized per tile by a pre-pass) and K (one scale per aligned block of ``KEY_BLOCK`` tokens; the key tiles
never cross a block) give exact int32 scores, turned into floats with one integer add; the softmax then costs
one multiply-add per score, as in exact mode. ``fp8`` also multiplies e4m3 P by e4m3 V^T into the fp32
accumulator (on an H200 as accurate as adding a fresh product per key tile, and 7.5% faster); P's scale 448
rides in the exponent (``2^(s - m + log2 448)``, no multiply) and in the row sum, where the normalization
cancels it. TMA faults on a
V^T column block that does not start 16-aligned (1560-token frames start anywhere), so fp8 loads every key tile
as the aligned block of ``BLOCK_N`` keys that holds it (8-bit tiles never cross one) and masks the columns
outside the tile (`_tile_origin`); it has no short tiles. Masked columns give P = 0, so the keys around the
tile are never zeroed: the 8-bit modes need finite inputs on every token. Its V^T stores the keys of every
aligned group of 32 in wgmma key order (`fp8_quant.wgmma_key_slot`), so e4m3 P enters the P V product from
the registers its scores were computed in (`_pv_operand`).

The kernel takes a non-negative softmax scale (the host negates q for a negative one). Gluon's API still
changes between Triton releases: the names that moved are bound in `gluon_compat`, which also says on which
releases the kernel is offered (elsewhere the portable kernel runs). The CPU interpreter cannot run Gluon: this
kernel is compiled for sm_90a against every tested release in CI (`compile_check`) and tested on the GPU; the
portable kernel keeps the interpreter tests.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
)

from .fp8_quant import KEY_QUANT_BLOCK
from .gluon_compat import cta_barrier, tma_load
from .hopper_ring import HALF_M, LN2, give_turn, pass_ring, ring_barriers, wait_turn

# fp8, ``rowsum_mma``: the accumulator of ``P 1``, the row sums of e4m3 P as 8 equal columns (4 registers)
ROW_SUM_LAYOUT = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, 8, 32]))
LOG2_P_SCALE = gl.constexpr(8.807354922057604)  # fp8: P = 448 * 2^(s - m) <= 448, e4m3's largest finite value
KEY_BLOCK = gl.constexpr(KEY_QUANT_BLOCK)  # 8-bit modes: tokens per K scale; key tiles never cross a block


# 2^x on the FMA units for x <= 9 (-inf included): x = n + f with n = floor(x) (one add rounding down onto the
# integers of 1.5 * 2^23), 2^f by a cubic on [0, 1) (relative error 7.5e-5, fitted for this kernel), then n added
# to the exponent bits; x < -126 gives 2^-126 (1.2e-38): negligible in the row sum, and its V rows are zeroed or
# its e4m3 P rounds to 0.
_POLY_EXP2 = """
    max.ftz.f32 x, {x}, 0fC2FC0000;
    add.rm.ftz.f32 t, x, 0f4B400000;
    sub.ftz.f32 f, t, 0f4B400000;
    sub.ftz.f32 f, x, f;
    fma.rn.ftz.f32 p, f, 0f3D9FCB14, 0f3E677E0A;
    fma.rn.ftz.f32 p, p, f, 0f3F322232;
    fma.rn.ftz.f32 p, p, f, 0f3F7FFB17;
    mov.b32 ti, t;
    mov.b32 pi, p;
    shl.b32 ti, ti, 23;
    add.s32 pi, pi, ti;
    mov.b32 {y}, pi;"""


# four scores per call: three on the MUFU unit (``ex2.approx``), the fourth by `_POLY_EXP2`
SPLIT_EXP2_ASM = gl.constexpr("{ .reg .f32 x, t, f, p; .reg .b32 ti, pi;"
                              + "".join(f"\n    ex2.approx.ftz.f32 ${i}, ${4 + i};" for i in range(3))
                              + _POLY_EXP2.format(x="$7", y="$3") + "\n}")


@gluon.jit
def _exp2(x, EXP2_POLY: gl.constexpr):
    """``2^x`` of scores ``x``: ``EXP2_POLY = 4`` computes one score in 4 on the FMA units (`_POLY_EXP2`) and
    the rest on the MUFU unit, whose 16 results per clock and SM can set the pace of the fp8 mode
    (FlashAttention-4's split); 0: all on the MUFU unit."""
    if EXP2_POLY == 4:
        return gl.inline_asm_elementwise(SPLIT_EXP2_ASM, "=f,=f,=f,=f,f,f,f,f", [x], dtype=gl.float32, is_pure=True,
                                         pack=4)
    else:
        return gl.exp2(x)


@gluon.jit
def _full_tile_scores(s, m_i, qk_scale, bias, P_SHIFT: gl.constexpr, EXP2_POLY: gl.constexpr):
    """One fused multiply-add per score (``qk_scale >= 0`` keeps the max); returns (p * 2^P_SHIFT, m)."""
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale - bias)
    return _exp2(s * qk_scale - (m_new + (bias - P_SHIFT))[:, None], EXP2_POLY), m_new


@gluon.jit
def _softmax_step(s, m_i, l_i, kv0, kv_end, base, qk_scale, bias, BLOCK_N: gl.constexpr, s_layout: gl.constexpr,
                  RAGGED: gl.constexpr, P_SHIFT: gl.constexpr, EXP2_POLY: gl.constexpr, SUM_ROWS: gl.constexpr):
    """Fold the scores ``s * qk_scale - bias`` (``qk_scale >= 0``) of key tile ``kv0 .. kv_end`` into the
    running max/sum; returns (p, m, l, alpha) with p and l scaled by ``2^P_SHIFT`` (the exponent takes the
    scale for free). ``s [64, BLOCK_N]``: column c is key ``base + c`` (``base <= kv0``: the tile was loaded
    from ``base``). Only a walk that may hold ragged tiles (``RAGGED``) carries the column mask: its per-thread
    column indices cost registers for the whole walk."""
    if RAGGED:
        if kv0 + BLOCK_N > kv_end:  # scale before masking: 0 * -inf would be NaN
            cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            # column - (kv0 - base) as a constant per register plus one of two per-thread values: written as
            # cols - (kv0 - base), the 32 per-thread columns are hoisted out of the walk (Triton 3.9 spilled them)
            rel = (cols & 7) - (kv0 - base)
            col8 = cols & ~7
            valid = (col8 + rel >= 0) & (col8 + rel < kv_end - kv0)
            s = gl.where(valid[None, :], s * qk_scale, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, 1) - bias)
            p = _exp2(s - (m_new + (bias - P_SHIFT))[:, None], EXP2_POLY)
        else:
            p, m_new = _full_tile_scores(s, m_i, qk_scale, bias, P_SHIFT, EXP2_POLY)
    else:
        p, m_new = _full_tile_scores(s, m_i, qk_scale, bias, P_SHIFT, EXP2_POLY)
    alpha = gl.exp2(m_i - m_new)
    if SUM_ROWS:  # else the walk sums P on the tensor cores
        l_i = l_i * alpha + gl.sum(p, 1)
    return p, m_new, l_i, alpha


@gluon.jit
def _fold_scores(s, m_i, l_i, kv0, kv_end, base, qk_scale, walk_scale, ks_base, s_layout: gl.constexpr,
                 QK_INT8: gl.constexpr, RAGGED: gl.constexpr, P_SHIFT: gl.constexpr, EXP2_POLY: gl.constexpr,
                 SUM_ROWS: gl.constexpr):
    """`_softmax_step` of the ``Q K^T`` accumulator ``s`` of key tile ``kv0 .. kv_end`` loaded from key
    ``base``; returns (p, m, l, alpha).

    8-bit modes: ``s`` holds int32 products of INT8 Q and K; the tile lies in one aligned K-scale block, so
    ``c = walk_scale * k_scale`` scales every score alike. int32 -> float32 without the (slow) conversion
    unit: |s| <= 127 * 127 * D < 2**22, so adding the bits of 1.5 * 2**23 gives the float ``f = 1.5 * 2**23
    + s`` exactly, and the score is ``f * c - 1.5 * 2**23 * c``: one fused multiply-add per score against the
    row max plus that bias, as in exact mode (the running max itself stays unbiased)."""
    BLOCK_N: gl.constexpr = s_layout.instr_shape[1]
    if QK_INT8:
        c = walk_scale * gl.load(ks_base + kv0 // KEY_BLOCK)
        f = (s + 0x4B400000).to(gl.float32, bitcast=True)
        return _softmax_step(f, m_i, l_i, kv0, kv_end, base, c, 12582912.0 * c, BLOCK_N, s_layout, RAGGED,
                             P_SHIFT, EXP2_POLY, SUM_ROWS)
    else:
        return _softmax_step(s, m_i, l_i, kv0, kv_end, base, qk_scale, 0.0, BLOCK_N, s_layout, RAGGED, P_SHIFT,
                             EXP2_POLY, SUM_ROWS)


@gluon.jit
def _zero_v_tail(v_buf, kv0, kv_end, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr):
    """Zero rows ``kv_end - kv0 ..`` of a ragged V tile in shared memory (keys outside the span may hold NaN)."""
    if kv0 + BLOCK_N > kv_end:
        blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        rows = kv0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, blk))
        v = v_buf.load(blk)
        v_buf.store(gl.where((rows < kv_end)[:, None], v, gl.zeros_like(v)))
        fence_async_shared()
        cta_barrier()


@gluon.jit
def _pv_operand(p, v_buf, kv0, kv_end, p_layout: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                RAGGED: gl.constexpr):
    """P of key tile ``kv0 ..`` as the A operand of ``P V``: e4m3 against V^T in e4m3 (fp8; P already carries
    its scale 448, see `LOG2_P_SCALE`), else in V's dtype, after zeroing the V rows of a ragged tile (keys
    outside the span may hold NaN).

    fp8: V^T stores its keys in wgmma key order (`fp8_quant.wgmma_key_slot`), so P's column ``16h + 8i + 2q + e``
    of each group of 32 goes to position ``16h + 4q + 2i + e``: a reshape and a permute that leave every score
    in the thread and register it was computed in (the conversion to the operand layout is asserted free;
    without the key order it costs a warp shuffle and a byte permute per 4 scores)."""
    if v_buf.dtype == gl.float8e4nv:
        ROWS: gl.constexpr = p.type.shape[0]
        x = gl.reshape(p.to(gl.float8e4nv), [ROWS, BLOCK_N // 32, 2, 2, 4, 2])  # key = 32g + 16h + 8i + 2q + e
        x = gl.reshape(gl.permute(x, [0, 1, 2, 4, 3, 5]), [ROWS, BLOCK_N])     # position 32g + 16h + 4q + 2i + e
        return gl.convert_layout(x, p_layout, assert_trivial=True)
    else:
        if RAGGED:
            _zero_v_tail(v_buf, kv0, kv_end, BLOCK_N, HEAD_DIM)
        return gl.convert_layout(p.to(v_buf.dtype), p_layout)


@gluon.jit
def _issue_pv(p_op, v_buf, acc):
    """Issue ``O += P V`` asynchronously (fp8: e4m3 P against the e4m3 V^T slot)."""
    if v_buf.dtype == gl.float8e4nv:
        return warpgroup_mma(p_op, v_buf.permute((1, 0)), acc, is_async=True)
    else:
        return warpgroup_mma(p_op, v_buf, acc, is_async=True)


@gluon.jit
def _tile_origin(kv0, BLOCK_N: gl.constexpr, FP8_PV: gl.constexpr):
    """The key from which key tile ``kv0 ..`` is loaded: fp8 loads the aligned block of ``BLOCK_N`` keys holding
    the tile (its V^T column blocks go through TMA, whose column starts must be 16-aligned; 8-bit key tiles never
    cross such a block) and masks the columns outside the tile; the other modes load from ``kv0``."""
    if FP8_PV:
        return kv0 // BLOCK_N * BLOCK_N
    else:
        return kv0


@gluon.jit
def _k_view(k_smem, stage, N: gl.constexpr):
    """Ring slot ``stage`` as the B operand K^T ``[D, N]`` of an ``N``-key tile (a short tile fills only the
    head of the slot)."""
    k_buf = k_smem.index(stage)
    if N < k_smem.type.shape[1]:
        k_buf = k_buf.slice(0, N)
    return k_buf.permute((1, 0))


@gluon.jit
def _v_view(v_smem, stage, N: gl.constexpr):
    """Ring slot ``stage`` as V ``[N, D]`` of an ``N``-key tile (V^T slots of fp8 have no short tiles)."""
    v_buf = v_smem.index(stage)
    if N < v_smem.type.shape[1]:
        v_buf = v_buf.slice(0, N)
    return v_buf


@gluon.jit
def _ones_operand(ones_smem, HALF: gl.constexpr, N: gl.constexpr):
    """Fill this consumer's tile of ones ``[8, N]`` (e4m3) and return it as the B operand ``[N, 8]`` of the
    row-sum product `_issue_row_sum`."""
    buf = ones_smem.index(HALF)
    blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    buf.store(gl.full([8, N], 1.0, gl.float32, blk).to(gl.float8e4nv))
    fence_async_shared()
    cta_barrier()
    return buf.permute((1, 0))


@gluon.jit
def _issue_row_sum(p_op, ones_t, acc, USE_ACC: gl.constexpr):
    """Issue ``P 1`` (``USE_ACC``: ``acc + P 1``) asynchronously: the row sums of e4m3 P on the tensor cores (an
    N=8 product; the operand P is already in registers, in the layout `ROW_SUM_LAYOUT`'s product takes). The
    walks take a fresh product per step and add it to their running sums in float32: the tensor cores' own
    accumulation over a whole row would keep only some 14 bits of mantissa, and lse reads l directly."""
    pl_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ROW_SUM_LAYOUT, k_width=4)
    return warpgroup_mma(gl.convert_layout(p_op, pl_layout, assert_trivial=True), ones_t, acc, use_acc=USE_ACC,
                         is_async=True)


@gluon.jit
def _attend_tiles(q, acc, m_i, l_i, j_lo, j_hi, turn0, pingpong, ring, scales, HALF: gl.constexpr,
                  N: gl.constexpr, RAGGED: gl.constexpr, EXP2_POLY: gl.constexpr, CONSUMERS: gl.constexpr,
                  ones_t):
    """Fold key tiles ``j_lo .. j_hi`` (> j_lo) of the row, all ``N`` keys wide, into ``(acc, m_i, l_i)``;
    ``RAGGED``: some may hold fewer keys (masked; otherwise every tile is full).

    ``S_j = Q K_j^T`` is issued together with ``O += P_{j-1} V_{j-1}`` (ptxas waits for both before the
    softmax of ``S_j``, see the module docstring); matrix-product issue ``t`` of this walk is turn ``turn0 + t``
    (`hopper_ring.wait_turn`). With ``CONSUMERS = 3`` (fp8, no turns) ``P V`` completes before ``Q K^T`` is
    issued: 160 registers per thread do not hold both products' operands and accumulators."""
    (k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, kv_tile_start, kv_tile_end, i_lo) = ring
    qk_scale, walk_scale, ks_base = scales
    STAGES: gl.constexpr = k_smem.type.shape[0]
    ROWS: gl.constexpr = q.type.shape[0]
    SERIAL: gl.constexpr = CONSUMERS > 2  # three consumers: 160 registers each, no room for both products
    gl.static_assert(not SERIAL or ones_t.dtype != gl.float8e4nv, "three consumers sum P on the FMA units")
    HEAD_DIM: gl.constexpr = k_smem.type.shape[2]
    QK_INT8: gl.constexpr = q.dtype == gl.int8
    FP8_PV: gl.constexpr = v_smem.dtype == gl.float8e4nv
    qk_k: gl.constexpr = 32 if QK_INT8 else 16  # wgmma K per instruction: 256 bits of the operand type
    pv_k: gl.constexpr = 32 if FP8_PV else 16
    P_SHIFT: gl.constexpr = LOG2_P_SCALE if FP8_PV else 0.0
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, N, qk_k])
    o_layout: gl.constexpr = acc.type.layout
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=pv_k // 8)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    if QK_INT8:
        s_init = gl.zeros([ROWS, N], gl.int32, s_layout)
    else:
        s_init = gl.zeros([ROWS, N], gl.float32, s_layout)
    m_i = gl.convert_layout(m_i, gl.SliceLayout(1, s_layout))
    l_i = gl.convert_layout(l_i, gl.SliceLayout(1, s_layout))
    ROWSUM: gl.constexpr = ones_t.dtype == gl.float8e4nv  # row sums on the tensor cores (fp8, rowsum_mma)
    row_l: gl.constexpr = gl.SliceLayout(1, ROW_SUM_LAYOUT)
    if ROWSUM:  # l_acc: the running sums in float32, 8 equal columns; l_zero: each step's fresh product
        l_zero = gl.zeros([ROWS, 8], gl.float32, ROW_SUM_LAYOUT)
        l_acc = l_zero + gl.convert_layout(l_i, row_l)[:, None]

    stage = j_lo % STAGES
    kv0 = gl.load(kv_tile_start + i_lo + j_lo)
    kv_end = gl.load(kv_tile_end + i_lo + j_lo)
    mbarrier.wait(k_ready.index(stage), (j_lo // STAGES) & 1)
    wait_turn(turn, HALF, turn0, pingpong)
    s_tok = warpgroup_mma(q, _k_view(k_smem, stage, N), s_init, use_acc=False, is_async=True)
    give_turn(turn, HALF, pingpong)
    s = warpgroup_mma_wait(0, deps=(s_tok, ))
    mbarrier.arrive(k_empty.index(stage), count=1)
    p, m_i, l_i, alpha = _fold_scores(s, m_i, l_i, kv0, kv_end, _tile_origin(kv0, N, FP8_PV), qk_scale, walk_scale,
                                      ks_base, s_layout, QK_INT8, RAGGED, P_SHIFT, EXP2_POLY, not ROWSUM)
    acc = acc * gl.convert_layout(alpha, row_o)[:, None]
    if ROWSUM:
        l_acc = l_acc * gl.convert_layout(alpha, row_l)[:, None]
    for j in range(j_lo + 1, j_hi):
        prev = stage
        stage = j % STAGES
        prev_v = _v_view(v_smem, prev, N)
        if SERIAL:  # P V of the previous tile done before Q K^T is issued: P's registers take S
            mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
            pv_tok = _issue_pv(_pv_operand(p, prev_v, kv0, kv_end, p_layout, N, HEAD_DIM, RAGGED), prev_v, acc)
            kv0 = gl.load(kv_tile_start + i_lo + j)  # read while the product runs, not after it
            kv_end = gl.load(kv_tile_end + i_lo + j)
            acc = warpgroup_mma_wait(0, deps=(pv_tok, ))
            mbarrier.arrive(v_empty.index(prev), count=1)
            mbarrier.wait(k_ready.index(stage), (j // STAGES) & 1)
            s_tok = warpgroup_mma(q, _k_view(k_smem, stage, N), s_init, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(0, deps=(s_tok, ))
            mbarrier.arrive(k_empty.index(stage), count=1)
            p, m_i, l_i, alpha = _fold_scores(s, m_i, l_i, kv0, kv_end, _tile_origin(kv0, N, FP8_PV), qk_scale,
                                              walk_scale, ks_base, s_layout, QK_INT8, RAGGED, P_SHIFT, EXP2_POLY,
                                              True)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        else:
            mbarrier.wait(k_ready.index(stage), (j // STAGES) & 1)
            mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
            p_op = _pv_operand(p, prev_v, kv0, kv_end, p_layout, N, HEAD_DIM, RAGGED)
            wait_turn(turn, HALF, turn0 + j - j_lo, pingpong)
            s_tok = warpgroup_mma(q, _k_view(k_smem, stage, N), s_init, use_acc=False, is_async=True)
            pv_tok = _issue_pv(p_op, prev_v, acc)
            if ROWSUM:
                l_tok = _issue_row_sum(p_op, ones_t, l_zero, False)
            give_turn(turn, HALF, pingpong)
            kv0 = gl.load(kv_tile_start + i_lo + j)  # read while the products run, not after them
            kv_end = gl.load(kv_tile_end + i_lo + j)
            s = warpgroup_mma_wait(2 if ROWSUM else 1, deps=(s_tok, ))
            mbarrier.arrive(k_empty.index(stage), count=1)
            p, m_i, l_i, alpha = _fold_scores(s, m_i, l_i, kv0, kv_end, _tile_origin(kv0, N, FP8_PV), qk_scale,
                                              walk_scale, ks_base, s_layout, QK_INT8, RAGGED, P_SHIFT, EXP2_POLY,
                                              not ROWSUM)
            if ROWSUM:
                pv, l_step = warpgroup_mma_wait(0, deps=(pv_tok, l_tok))
                l_acc = (l_acc + l_step) * gl.convert_layout(alpha, row_l)[:, None]
            else:
                pv = warpgroup_mma_wait(0, deps=(pv_tok, ))
            mbarrier.arrive(v_empty.index(prev), count=1)
            acc = pv * gl.convert_layout(alpha, row_o)[:, None]
    v_buf = _v_view(v_smem, stage, N)
    mbarrier.wait(v_ready.index(stage), ((j_hi - 1) // STAGES) & 1)
    p_op = _pv_operand(p, v_buf, kv0, kv_end, p_layout, N, HEAD_DIM, RAGGED)
    wait_turn(turn, HALF, turn0 + j_hi - j_lo, pingpong)
    pv_tok = _issue_pv(p_op, v_buf, acc)
    if ROWSUM:
        l_tok = _issue_row_sum(p_op, ones_t, l_zero, False)
    give_turn(turn, HALF, pingpong)
    if ROWSUM:
        pv, l_step = warpgroup_mma_wait(0, deps=(pv_tok, l_tok))
        l_i = gl.convert_layout(gl.max(l_acc + l_step, 1), gl.SliceLayout(1, s_layout))
    else:
        pv = warpgroup_mma_wait(0, deps=(pv_tok, ))
    mbarrier.arrive(v_empty.index(stage), count=1)
    acc = pv
    return acc, gl.convert_layout(m_i, row_o), gl.convert_layout(l_i, row_o)


@gluon.jit
def _fold_pair(sa, sb, m_i, l_i, kv_a, kv_b, walk_scale, ks_base, EXP2_POLY: gl.constexpr, SUM_ROWS: gl.constexpr):
    """fp8: `_fold_scores` of two full key tiles at once (``sa``, ``sb``: int32 scores of the aligned blocks from
    ``kv_a`` and ``kv_b``, one K scale each): one running-max update, one ``alpha`` and one row-sum update for
    both; returns (p_a, p_b, m, l, alpha)."""
    ca = walk_scale * gl.load(ks_base + kv_a // KEY_BLOCK)
    cb = walk_scale * gl.load(ks_base + kv_b // KEY_BLOCK)
    fa = (sa + 0x4B400000).to(gl.float32, bitcast=True)
    fb = (sb + 0x4B400000).to(gl.float32, bitcast=True)
    bias_a = 12582912.0 * ca
    bias_b = 12582912.0 * cb
    m_new = gl.maximum(m_i, gl.maximum(gl.max(fa, 1) * ca - bias_a, gl.max(fb, 1) * cb - bias_b))
    pa = _exp2(fa * ca - (m_new + (bias_a - LOG2_P_SCALE))[:, None], EXP2_POLY)
    pb = _exp2(fb * cb - (m_new + (bias_b - LOG2_P_SCALE))[:, None], EXP2_POLY)
    alpha = gl.exp2(m_i - m_new)
    if SUM_ROWS:  # else the walk sums P on the tensor cores
        l_i = l_i * alpha + (gl.sum(pa, 1) + gl.sum(pb, 1))
    return pa, pb, m_new, l_i, alpha


@gluon.jit
def _attend_tile_pairs(q, acc, m_i, l_i, j_lo, j_hi, ring, scales, ones_t, HALF: gl.constexpr,
                       EXP2_POLY: gl.constexpr):
    """fp8: fold the full key tiles ``j_lo .. j_hi`` (an even count > 0) two per step into ``(acc, m_i, l_i)``:
    both tiles' ``Q K^T`` are issued together, one softmax step takes both, and both ``P V`` products are issued
    together, so the per-step chain (barrier waits, product round trip, reductions, rescale of O) runs once per
    two tiles. Each tile keeps its ring slot and its K scale. ``S`` of the next pair is issued with ``P V`` of
    the previous one, as in `_attend_tiles`."""
    (k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, kv_tile_start, kv_tile_end, i_lo) = ring
    qk_scale, walk_scale, ks_base = scales
    STAGES: gl.constexpr = k_smem.type.shape[0]
    N: gl.constexpr = k_smem.type.shape[1]
    ROWS: gl.constexpr = q.type.shape[0]
    HEAD_DIM: gl.constexpr = k_smem.type.shape[2]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, N, 32])
    o_layout: gl.constexpr = acc.type.layout
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    s_init = gl.zeros([ROWS, N], gl.int32, s_layout)
    m_i = gl.convert_layout(m_i, gl.SliceLayout(1, s_layout))
    l_i = gl.convert_layout(l_i, gl.SliceLayout(1, s_layout))
    ROWSUM: gl.constexpr = ones_t.dtype == gl.float8e4nv  # row sums on the tensor cores (rowsum_mma)
    row_l: gl.constexpr = gl.SliceLayout(1, ROW_SUM_LAYOUT)
    if ROWSUM:  # l_acc: the running sums in float32 (see `_issue_row_sum`); l_zero: each pair's fresh product
        l_zero = gl.zeros([ROWS, 8], gl.float32, ROW_SUM_LAYOUT)
        l_acc = l_zero + gl.convert_layout(l_i, row_l)[:, None]

    a = j_lo % STAGES
    b = (j_lo + 1) % STAGES
    kv_a = gl.load(kv_tile_start + i_lo + j_lo)
    kv_b = gl.load(kv_tile_start + i_lo + j_lo + 1)
    mbarrier.wait(k_ready.index(a), (j_lo // STAGES) & 1)
    mbarrier.wait(k_ready.index(b), ((j_lo + 1) // STAGES) & 1)
    sa_tok = warpgroup_mma(q, _k_view(k_smem, a, N), s_init, use_acc=False, is_async=True)
    sb_tok = warpgroup_mma(q, _k_view(k_smem, b, N), s_init, use_acc=False, is_async=True)
    sa, sb = warpgroup_mma_wait(0, deps=(sa_tok, sb_tok))
    mbarrier.arrive(k_empty.index(a), count=1)
    mbarrier.arrive(k_empty.index(b), count=1)
    pa, pb, m_i, l_i, alpha = _fold_pair(sa, sb, m_i, l_i, kv_a, kv_b, walk_scale, ks_base, EXP2_POLY,
                                             not ROWSUM)
    acc = acc * gl.convert_layout(alpha, row_o)[:, None]
    if ROWSUM:
        l_acc = l_acc * gl.convert_layout(alpha, row_l)[:, None]
    for j in range(j_lo + 2, j_hi, 2):
        prev_a = a
        prev_b = b
        a = j % STAGES
        b = (j + 1) % STAGES
        mbarrier.wait(v_ready.index(prev_a), ((j - 2) // STAGES) & 1)
        mbarrier.wait(v_ready.index(prev_b), ((j - 1) // STAGES) & 1)
        va = v_smem.index(prev_a)
        vb = v_smem.index(prev_b)
        pa_op = _pv_operand(pa, va, 0, 0, p_layout, N, HEAD_DIM, False)
        pb_op = _pv_operand(pb, vb, 0, 0, p_layout, N, HEAD_DIM, False)
        pv_tok = _issue_pv(pa_op, va, acc)
        pv_tok = _issue_pv(pb_op, vb, pv_tok)
        if ROWSUM:
            l_tok = _issue_row_sum(pb_op, ones_t, _issue_row_sum(pa_op, ones_t, l_zero, False), True)
        mbarrier.wait(k_ready.index(a), (j // STAGES) & 1)
        sa_tok = warpgroup_mma(q, _k_view(k_smem, a, N), s_init, use_acc=False, is_async=True)
        kv_a = gl.load(kv_tile_start + i_lo + j)  # read while the products run, not after them
        kv_b = gl.load(kv_tile_start + i_lo + j + 1)
        if ROWSUM:
            acc, l_step = warpgroup_mma_wait(1, deps=(pv_tok, l_tok))
            l_acc = l_acc + l_step
        else:
            acc = warpgroup_mma_wait(1, deps=(pv_tok, ))  # P V done: P's registers take S_b
        mbarrier.arrive(v_empty.index(prev_a), count=1)
        mbarrier.arrive(v_empty.index(prev_b), count=1)
        mbarrier.wait(k_ready.index(b), ((j + 1) // STAGES) & 1)
        sb_tok = warpgroup_mma(q, _k_view(k_smem, b, N), s_init, use_acc=False, is_async=True)
        sa, sb = warpgroup_mma_wait(0, deps=(sa_tok, sb_tok))
        mbarrier.arrive(k_empty.index(a), count=1)
        mbarrier.arrive(k_empty.index(b), count=1)
        pa, pb, m_i, l_i, alpha = _fold_pair(sa, sb, m_i, l_i, kv_a, kv_b, walk_scale, ks_base, EXP2_POLY,
                                             not ROWSUM)
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        if ROWSUM:
            l_acc = l_acc * gl.convert_layout(alpha, row_l)[:, None]
    mbarrier.wait(v_ready.index(a), ((j_hi - 2) // STAGES) & 1)
    mbarrier.wait(v_ready.index(b), ((j_hi - 1) // STAGES) & 1)
    va = v_smem.index(a)
    vb = v_smem.index(b)
    pa_op = _pv_operand(pa, va, 0, 0, p_layout, N, HEAD_DIM, False)
    pb_op = _pv_operand(pb, vb, 0, 0, p_layout, N, HEAD_DIM, False)
    pv_tok = _issue_pv(pa_op, va, acc)
    pv_tok = _issue_pv(pb_op, vb, pv_tok)
    if ROWSUM:
        l_tok = _issue_row_sum(pb_op, ones_t, _issue_row_sum(pa_op, ones_t, l_zero, False), True)
        acc, l_step = warpgroup_mma_wait(0, deps=(pv_tok, l_tok))
        l_i = gl.convert_layout(gl.max(l_acc + l_step, 1), gl.SliceLayout(1, s_layout))
    else:
        acc = warpgroup_mma_wait(0, deps=(pv_tok, ))
    mbarrier.arrive(v_empty.index(a), count=1)
    mbarrier.arrive(v_empty.index(b), count=1)
    return acc, gl.convert_layout(m_i, row_o), gl.convert_layout(l_i, row_o)


@gluon.jit
def _consume(args, HALF: gl.constexpr, TILES_PER_STEP: gl.constexpr):
    (q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, turn,
     kv_tile_start, kv_tile_end, i_lo, n_kv, n_masked, q0, q1,
     o_base, stride_os, lse_base, qk_scale, walk_scale, ks_base, qmu_base, vs_base, k_short, EXP2_POLY,
     ones_smem) = args
    BLOCK_N: gl.constexpr = k_smem.type.shape[1]
    HEAD_DIM: gl.constexpr = k_smem.type.shape[2]
    ROWS: gl.constexpr = q_smem.type.shape[1]
    QK_INT8: gl.constexpr = q_smem.dtype == gl.int8
    FP8_PV: gl.constexpr = v_smem.dtype == gl.float8e4nv  # V^T tiles [HEAD_DIM, BLOCK_N], P in e4m3
    CONSUMERS: gl.constexpr = q_smem.type.shape[0]
    out_dtype: gl.constexpr = o_base.dtype.element_ty
    SHORT_N: gl.constexpr = k_short.block_type.shape[0]  # BLOCK_N: no short tiles
    pv_k: gl.constexpr = 32 if FP8_PV else 16
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, pv_k])
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    r0 = q0 + HALF * ROWS
    if FP8_PV:  # fp8's products are short next to its softmax: turns cost it 3.4% on an H100 (tenth session)
        pingpong = q1 < q0  # false at run time: the turn operations stay in the code, predicated off, as measured
    else:
        pingpong = q1 - q0 > ROWS
    m_i = gl.full([ROWS], float("-inf"), gl.float32, row_o)
    l_i = gl.full([ROWS], 0.0, gl.float32, row_o)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
    if r0 >= q1:  # no rows of this tile here (so no turns either): only keep the ring moving
        pass_ring(k_ready, k_empty, v_ready, v_empty, n_kv)
    elif n_kv > 0:
        q = q_smem.index(HALF)
        mbarrier.wait(q_bar.index(HALF), 0)
        ring = (k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, kv_tile_start, kv_tile_end, i_lo)
        scales = (qk_scale, walk_scale, ks_base)
        if ones_smem.dtype == gl.float8e4nv:  # rowsum_mma: this consumer's tile of ones, filled once
            ones_t = _ones_operand(ones_smem, HALF, BLOCK_N)
        else:
            ones_t = ones_smem
        n_full = n_kv - n_masked
        if TILES_PER_STEP == 2:  # fp8: the full tiles two per step; an odd one left joins the masked walk
            n_pairs = n_full - n_full % 2
            if n_pairs > 0:
                acc, m_i, l_i = _attend_tile_pairs(q, acc, m_i, l_i, 0, n_pairs, ring, scales, ones_t, HALF,
                                                   EXP2_POLY)
            if n_kv > n_pairs:
                acc, m_i, l_i = _attend_tiles(q, acc, m_i, l_i, n_pairs, n_kv, 0, pingpong, ring, scales, HALF,
                                              BLOCK_N, True, EXP2_POLY, CONSUMERS, ones_t)
        else:
            if n_full > 0:
                acc, m_i, l_i = _attend_tiles(q, acc, m_i, l_i, 0, n_full, 0, pingpong, ring, scales, HALF,
                                              BLOCK_N, False, EXP2_POLY, CONSUMERS, ones_t)
            if SHORT_N < BLOCK_N or FP8_PV:  # a masked tail: short tiles, or fp8's ragged BLOCK_N-wide ones
                if n_masked > 0:  # n_full + 1 turns were taken above
                    turn0 = gl.where(n_full > 0, n_full + 1, 0)
                    acc, m_i, l_i = _attend_tiles(q, acc, m_i, l_i, n_full, n_kv, turn0, pingpong, ring, scales,
                                                  HALF, SHORT_N, True, EXP2_POLY, CONSUMERS, ones_t)

    has_keys = l_i > 0.0
    l_safe = gl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    if FP8_PV:  # undo V's per-channel scales (P's scale 448 is in l too, so the ratio drops it)
        out = out * gl.load(vs_base + cols)[None, :]
    rows_o = r0 + gl.arange(0, ROWS, layout=row_o)
    o_ptrs = o_base + rows_o[:, None].to(gl.int64) * stride_os + cols[None, :]
    gl.store(o_ptrs, out.to(out_dtype), mask=(rows_o < q1)[:, None])
    if QK_INT8:  # the scores were of the smoothed keys: add back q . k_mean
        m_i = m_i + gl.load(qmu_base + rows_o, mask=rows_o < q1, other=0.0) * qk_scale
    if FP8_PV:
        m_i = m_i - LOG2_P_SCALE
    lse = gl.where(has_keys, (m_i + gl.log2(l_safe)) * LN2, float("-inf"))
    gl.store(lse_base + rows_o, lse, mask=rows_o < q1)


@gluon.jit
def _load(args):
    (q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, turn,
     kv_tile_start, kv_tile_end, i_lo, n_kv, n_masked, q0, q1, q_desc, k_desc, v_desc, k_short, v_short) = args
    STAGES: gl.constexpr = k_smem.type.shape[0]
    BLOCK_N: gl.constexpr = k_smem.type.shape[1]
    ROWS: gl.constexpr = q_smem.type.shape[1]
    FP8_PV: gl.constexpr = v_smem.dtype == gl.float8e4nv
    SHORT_N: gl.constexpr = k_short.block_type.shape[0]
    HAS_SHORT: gl.constexpr = SHORT_N < BLOCK_N
    CONSUMERS: gl.constexpr = q_smem.type.shape[0]
    for half in gl.static_range(CONSUMERS):  # only parts a consumer will wait for (no copy may outlive the program)
        needed = (n_kv > 0) & (q0 + half * ROWS < q1)
        mbarrier.expect(q_bar.index(half), q_desc.block_type.nbytes, pred=needed)
        tma_load(q_desc, [q0 + half * ROWS, 0], q_bar.index(half), q_smem.index(half),
                                        pred=needed)
    n_full = n_kv - n_masked
    for j in range(n_kv):
        stage = j % STAGES
        phase = (j // STAGES) & 1
        kv0 = gl.load(kv_tile_start + i_lo + j)
        short = HAS_SHORT and j >= n_full
        origin = _tile_origin(kv0, BLOCK_N, FP8_PV)
        mbarrier.wait(k_empty.index(stage), phase ^ 1)
        _load_rows(k_desc, k_short, k_smem.index(stage), k_ready.index(stage), origin, short)
        mbarrier.wait(v_empty.index(stage), phase ^ 1)
        if FP8_PV:  # V^T [HEAD_DIM, S_pad] in wgmma key order: the tile's aligned block is a column block
            mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
            tma_load(v_desc, [0, origin], v_ready.index(stage), v_smem.index(stage))
        else:
            _load_rows(v_desc, v_short, v_smem.index(stage), v_ready.index(stage), kv0, short)


@gluon.jit
def _load_rows(desc, short_desc, slot, ready, kv0, short):
    """TMA-load the key tile from token ``kv0`` into ring ``slot``: all of it, or (``short``) its first
    ``short_desc`` rows; ``ready`` expects the bytes."""
    if short:
        mbarrier.expect(ready, short_desc.block_type.nbytes)
        tma_load(short_desc, [kv0, 0], ready, slot.slice(0, short_desc.block_type.shape[0]))
    else:
        mbarrier.expect(ready, desc.block_type.nbytes)
        tma_load(desc, [kv0, 0], ready, slot)


@gluon.jit
def block_sparse_attn_fwd_hopper(
    Q, K, V, O, LSE,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    tile_ptr, tile_start, tile_end, tile_row,
    row_kv_ptr, kv_tile_start, kv_tile_end, row_kv_masked,
    qk_scale, q_len, kv_len,
    Q_SCALE, Q_MU, K_SCALE, V_SCALE, q_scale_stride,
    NUM_HEADS: gl.constexpr, KV_GROUP: gl.constexpr, PER_HEAD_LAYOUT: gl.constexpr,
    HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, SHORT_N: gl.constexpr, STAGES: gl.constexpr,
    Q_LAYOUT: gl.constexpr, K_LAYOUT: gl.constexpr, V_LAYOUT: gl.constexpr, CONSUMER_REGS: gl.constexpr,
    EXP2_POLY: gl.constexpr, TILES_PER_STEP: gl.constexpr, CONSUMERS: gl.constexpr, ROWSUM_MMA: gl.constexpr,
):
    """Grid ``(max query tiles per layout head, B * H)``; ``num_warps`` must be 4 (the first consumer).

    Precision follows the tensors: Q/K in the input dtype (exact), or `quantize_q_tiles`' INT8 Q with
    ``Q_SCALE [B * H, q_scale_stride]`` and ``Q_MU [B, H, Sq]`` and `quantize_kv`'s INT8 K with ``K_SCALE
    [B, H_kv, cdiv(kv_len, KEY_BLOCK)]`` (8-bit modes); V in the input dtype, or e4m3 V^T ``[B, H_kv, D, S_pad]``
    in wgmma key order, contiguous (``stride_vs`` = its channel stride = S_pad), with ``V_SCALE [B, H_kv, D]``
    (``precision="fp8"``). Unused pointers may be any tensor. ``SHORT_N``: `KeyTiles.short_n` (0: no short
    tiles). ``EXP2_POLY``: 0, or 4 to compute one softmax exponential in 4 on the FMA units (`_exp2`).
    fp8 only: ``TILES_PER_STEP`` 2 folds the full key tiles in pairs; ``CONSUMERS`` 3 takes 192-row query tiles;
    ``ROWSUM_MMA`` sums P's rows on the tensor cores (two consumers)."""
    pid_t = gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // NUM_HEADS
    h = pid_bh % NUM_HEADS
    h_kv = h // KV_GROUP
    if PER_HEAD_LAYOUT:
        lh = h
    else:
        lh = 0
    t_lo = gl.load(tile_ptr + lh)
    valid = pid_t < gl.load(tile_ptr + lh + 1) - t_lo  # programs past the head's last tile do nothing
    t = t_lo + pid_t
    q0 = gl.load(tile_start + t, mask=valid, other=0)
    q1 = gl.load(tile_end + t, mask=valid, other=0)
    row = gl.load(tile_row + t, mask=valid, other=0)
    i_lo = gl.load(row_kv_ptr + row)
    n_kv = gl.where(valid, gl.load(row_kv_ptr + row + 1) - i_lo, 0)
    n_masked = gl.where(valid, gl.load(row_kv_masked + row), 0)

    b64 = b.to(gl.int64)
    h64 = h.to(gl.int64)
    h_kv64 = h_kv.to(gl.int64)
    bh_kv = b64 * (NUM_HEADS // KV_GROUP) + h_kv64
    q_dtype: gl.constexpr = Q.dtype.element_ty
    k_dtype: gl.constexpr = K.dtype.element_ty
    v_dtype: gl.constexpr = V.dtype.element_ty
    FP8_PV: gl.constexpr = v_dtype == gl.float8e4nv
    q_desc = tma.make_tensor_descriptor(Q + b64 * stride_qb + h64 * stride_qh, shape=[q_len, HEAD_DIM],
                                        strides=[stride_qs, 1], block_shape=[HALF_M, HEAD_DIM], layout=Q_LAYOUT)
    k_desc = tma.make_tensor_descriptor(K + b64 * stride_kb + h_kv64 * stride_kh, shape=[kv_len, HEAD_DIM],
                                        strides=[stride_ks, 1], block_shape=[BLOCK_N, HEAD_DIM], layout=K_LAYOUT)
    if SHORT_N > 0:
        k_short = tma.make_tensor_descriptor(K + b64 * stride_kb + h_kv64 * stride_kh, shape=[kv_len, HEAD_DIM],
                                             strides=[stride_ks, 1], block_shape=[SHORT_N, HEAD_DIM], layout=K_LAYOUT)
    else:  # no short tiles (the loader and consumers read that off the block shape)
        k_short = k_desc
    if FP8_PV:
        # V^T rows hold S_pad = stride_vs columns, zero past kv_len: in wgmma key order keys near the end may
        # sit past kv_len (`fp8_quant.wgmma_key_slot`), so the whole row is in bounds
        v_desc = tma.make_tensor_descriptor(V + b64 * stride_vb + h_kv64 * stride_vh, shape=[HEAD_DIM, stride_vs],
                                            strides=[stride_vs, 1], block_shape=[HEAD_DIM, BLOCK_N],
                                            layout=V_LAYOUT)
        v_smem = gl.allocate_shared_memory(v_dtype, [STAGES, HEAD_DIM, BLOCK_N], V_LAYOUT)
        v_short = v_desc
    else:
        v_desc = tma.make_tensor_descriptor(V + b64 * stride_vb + h_kv64 * stride_vh, shape=[kv_len, HEAD_DIM],
                                            strides=[stride_vs, 1], block_shape=[BLOCK_N, HEAD_DIM],
                                            layout=V_LAYOUT)
        v_smem = gl.allocate_shared_memory(v_dtype, [STAGES, BLOCK_N, HEAD_DIM], V_LAYOUT)
        if SHORT_N > 0:
            v_short = tma.make_tensor_descriptor(V + b64 * stride_vb + h_kv64 * stride_vh,
                                                 shape=[kv_len, HEAD_DIM], strides=[stride_vs, 1],
                                                 block_shape=[SHORT_N, HEAD_DIM], layout=V_LAYOUT)
        else:
            v_short = v_desc
    q_smem = gl.allocate_shared_memory(q_dtype, [CONSUMERS, HALF_M, HEAD_DIM], Q_LAYOUT)
    k_smem = gl.allocate_shared_memory(k_dtype, [STAGES, BLOCK_N, HEAD_DIM], K_LAYOUT)
    q_bar = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(CONSUMERS):
        mbarrier.init(q_bar.index(i), count=1)
    k_ready, k_empty, v_ready, v_empty, turn = ring_barriers(STAGES, CONSUMERS)

    walk_scale = qk_scale
    if q_dtype == gl.int8:  # the tile's Q scale folds into the softmax scale
        walk_scale = qk_scale * gl.load(Q_SCALE + pid_bh.to(gl.int64) * q_scale_stride + pid_t, mask=valid,
                                        other=1.0)
    ring = (q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, turn,
            kv_tile_start, kv_tile_end, i_lo, n_kv, n_masked, q0, q1)
    o_base = O + b64 * stride_ob + h64 * stride_oh
    lse_base = LSE + (b64 * NUM_HEADS + h) * q_len
    key_blocks = (kv_len + KEY_BLOCK - 1) // KEY_BLOCK
    consumer_args = ring + (o_base, stride_os, lse_base, qk_scale, walk_scale, K_SCALE + bh_kv * key_blocks,
                            Q_MU + (b64 * NUM_HEADS + h) * q_len, V_SCALE + bh_kv * HEAD_DIM, k_short, EXP2_POLY)
    gl.static_assert(not ROWSUM_MMA or (FP8_PV and CONSUMERS == 2), "rowsum_mma: fp8 with two consumers only")
    if ROWSUM_MMA:  # each consumer's tile of ones (`_ones_operand`)
        ones_smem = gl.allocate_shared_memory(gl.float8e4nv, [CONSUMERS, 8, BLOCK_N], V_LAYOUT)
    else:  # an unread placeholder of another dtype: the consumers read the choice off it
        ones_smem = q_bar
    consumer_args = consumer_args + (ones_smem, )
    loader_args = ring + (q_desc, k_desc, v_desc, k_short, v_short)
    # a consumer's constexprs are arguments of their own: Triton 3.8 passes the constexprs inside a tuple as
    # run-time values, and there a branch on one that calls a function fails to compile
    if CONSUMERS == 3:
        gl.warp_specialize([
            (_consume, (consumer_args, 0, TILES_PER_STEP)),
            (_consume, (consumer_args, 1, TILES_PER_STEP)),
            (_consume, (consumer_args, 2, TILES_PER_STEP)),
            (_load, (loader_args, )),
        ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, 32])
    else:
        gl.warp_specialize([
            (_consume, (consumer_args, 0, TILES_PER_STEP)),
            (_consume, (consumer_args, 1, TILES_PER_STEP)),
            (_load, (loader_args, )),
        ], [4, 1], [CONSUMER_REGS, 32])
