"""Triton kernels that plan one SVOO cluster-attention call on the device (see `cluster_attn.py` for the
vocabulary): `plan_key_tiles` packs each row's selected key clusters into segments and cuts them into key
tiles, `plan_query_tiles` orders each group's query clusters heaviest first and cuts them into query tiles.

Both write their intermediate arrays to a global scratch buffer and read them back after a block-wide
barrier (one program = one row or one group), so a whole plan is two launches with sizes fixed by the shapes.
"""
import triton
import triton.language as tl


@triton.jit
def _cut_key_tiles(cum, dl, total, out, tile_count, slots, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr):
    """Greedy cut of one row's packed keys (``cum``, ``dl``: its segment starts and deltas) into key tiles.

    Record of a tile (``2 * WINDOW + 1`` int32): ``c0, c1, delta[s0]``, then for ``w = 1 .. WINDOW - 1``:
    ``cum[s0 + w], delta[s0 + w] - delta[s0 + w - 1]``, so that the KP row of column c is
    ``c + delta[s0] + sum_w (c >= cum[s0 + w]) * step_w``. Full tiles (``BLOCK_N`` columns) fill the
    ``slots`` from the front, partial ones from the back; ``tile_count[0:2] = (full, partial)``.
    """
    ahead = tl.arange(0, WINDOW) + 1
    c0 = total * 0
    s0 = total * 0
    n_full = total * 0
    n_part = total * 0
    while c0 < total:
        c1 = tl.minimum(c0 + BLOCK_N, tl.load(cum + s0 + WINDOW))
        full = c1 - c0 == BLOCK_N
        rec = out + tl.where(full, n_full, slots - 1 - n_part).to(tl.int64) * (2 * WINDOW + 1)
        tl.store(rec, c0)
        tl.store(rec + 1, c1)
        tl.store(rec + 2, tl.load(dl + s0))
        for w in tl.static_range(1, WINDOW):
            tl.store(rec + 2 * w + 1, tl.load(cum + s0 + w))
            tl.store(rec + 2 * w + 2, tl.load(dl + s0 + w) - tl.load(dl + s0 + w - 1))
        n_full += full.to(tl.int32)
        n_part += 1 - full.to(tl.int32)
        s0 += tl.sum((tl.load(cum + s0 + ahead) <= c1).to(tl.int32))
        c0 = c1
    tl.store(tile_count, n_full)
    tl.store(tile_count + 1, n_part)


@triton.jit
def plan_key_tiles(MASK, K_SIZES, SEG, KEYS_PER_ROW, TILES1, COUNT1, TILES2, COUNT2, n_q, n_k, seg_stride,
                   slots1, slots2, BLOCK_K: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_N2: tl.constexpr,
                   WINDOW: tl.constexpr):
    """Segments and key tiles of row ``r = program_id(0)`` (query cluster ``r % n_q`` of group ``r // n_q``).

    MASK bool ``[R, n_k]`` (selected key clusters), K_SIZES int64 ``[G, n_k]``. A row's segments are its
    selected non-empty key clusters in cluster order; SEG int32 ``[R, 2, seg_stride]`` (scratch,
    ``seg_stride >= n_k + WINDOW + 1``) receives their packed start columns (then the row total) and their
    deltas KP row - column (then ``-total``). Writes KEYS_PER_ROW int64 ``[R]`` (the row total), the key
    tiles of ``BLOCK_N1`` columns (TILES1 ``[R, slots1, 2 * WINDOW + 1]``, COUNT1 ``[R, 2]``, see
    `_cut_key_tiles`) and, when ``BLOCK_N2 > 0``, those of ``BLOCK_N2`` columns (TILES2, COUNT2).
    """
    r = tl.program_id(0).to(tl.int64)
    g = r // n_q
    j = tl.arange(0, BLOCK_K)
    ok = j < n_k
    size = tl.load(K_SIZES + g * n_k + j, mask=ok, other=0).to(tl.int32)
    sel = (tl.load(MASK + r * n_k + j, mask=ok, other=0) != 0) & (size > 0)
    length = tl.where(sel, size, 0)
    start = tl.cumsum(size, 0) - size  # first KP row of key cluster j
    col = tl.cumsum(length, 0) - length  # first packed column of segment j
    pos = tl.cumsum(sel.to(tl.int32), 0) - 1
    total = tl.sum(length, 0)
    count = tl.sum(sel.to(tl.int32), 0)
    cum = SEG + r * 2 * seg_stride
    dl = cum + seg_stride
    tl.store(cum + pos, col, mask=sel)
    tl.store(dl + pos, start - col, mask=sel)
    for p0 in range(0, seg_stride, BLOCK_K):
        p = p0 + j
        rest = (p >= count) & (p < seg_stride)
        tl.store(cum + p, total + p * 0, mask=rest)
        tl.store(dl + p, -total + p * 0, mask=rest)
    tl.store(KEYS_PER_ROW + r, total.to(tl.int64))
    tl.debug_barrier()  # the walk reads what other threads stored
    _cut_key_tiles(cum, dl, total, TILES1 + r * slots1 * (2 * WINDOW + 1), COUNT1 + 2 * r, slots1, BLOCK_N1, WINDOW)
    if BLOCK_N2 > 0:
        _cut_key_tiles(cum, dl, total, TILES2 + r * slots2 * (2 * WINDOW + 1), COUNT2 + 2 * r, slots2, BLOCK_N2,
                       WINDOW)


@triton.jit
def _cut_query_tiles(ROW, Q0, Q1, g, n_q, slots, order, count, lo, hi, last, BLOCK_M: tl.constexpr,
                     BLOCK_S: tl.constexpr):
    """Write ``count[i]`` tiles of ``BLOCK_M`` positions for the i-th row of ``order``, from ``lo[i]`` up to
    ``hi[i]``, into consecutive slots of group g (unused slots: ``q0 = q1 = 0``, row of ``last``)."""
    first = tl.cumsum(count, 0) - count
    base = g * slots
    for t in range(0, tl.max(count, 0)):  # tile t of every row at once
        todo = t < count
        q0 = lo + t * BLOCK_M
        tl.store(ROW + base + first + t, (g * n_q + order).to(tl.int32), mask=todo)
        tl.store(Q0 + base + first + t, q0.to(tl.int32), mask=todo)
        tl.store(Q1 + base + first + t, tl.minimum(q0 + BLOCK_M, hi).to(tl.int32), mask=todo)
    used = tl.sum(count, 0)
    for s0 in range(0, slots, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        free = (s >= used) & (s < slots)
        tl.store(ROW + base + s, (g * n_q + last + s * 0).to(tl.int32), mask=free)
        tl.store(Q0 + base + s, s * 0, mask=free)
        tl.store(Q1 + base + s, s * 0, mask=free)


@triton.jit
def plan_query_tiles(KEYS_PER_ROW, Q_SIZES, Q_START, ROW1, Q01, Q11, ROW2, Q02, Q12, n_q, slots1, slots2,
                     BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr, BM1: tl.constexpr, BM2: tl.constexpr):
    """Query tiles of group ``g = program_id(0)``: its rows ordered by KEYS_PER_ROW int64 ``[G * n_q]``
    descending (stable), each query cluster (Q_SIZES int64 ``[G, n_q]`` positions) cut into tiles of ``BM1``
    rows (ROW1, Q01, Q11 int32 ``[G, slots1]``) and, when ``BM2 > 0``, a remainder of at most ``BM2`` rows as one
    tile of ``BM2`` (ROW2, Q02, Q12 ``[G, slots2]``); a longer remainder is one more ``BM1`` tile.
    Q_START int64 ``[G, BLOCK_Q]`` is scratch (the clusters' first positions).
    """
    g = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK_Q)
    ok = i < n_q
    size = tl.load(Q_SIZES + g * n_q + i, mask=ok, other=0)
    tl.store(Q_START + g * BLOCK_Q + i, tl.cumsum(size, 0) - size)
    work = tl.load(KEYS_PER_ROW + g * n_q + i, mask=ok, other=-1)  # padding sorts last
    key = tl.sort(work * BLOCK_Q + (BLOCK_Q - 1 - i), descending=True)  # ties: lower index first
    real = i < n_q
    order = tl.where(real, BLOCK_Q - 1 - key % BLOCK_Q, 0)
    last = tl.sum(tl.where(i == n_q - 1, order, 0), 0)
    tl.debug_barrier()  # Q_START is read below at other threads' positions
    size = tl.load(Q_SIZES + g * n_q + order, mask=real, other=0)
    start = tl.load(Q_START + g * BLOCK_Q + order, mask=real, other=0)
    rem = size % BM1
    _cut_query_tiles(ROW1, Q01, Q11, g, n_q, slots1, order, size // BM1 + (rem > BM2).to(tl.int64), start,
                     start + size, last, BM1, BLOCK_S)
    if BM2 > 0:
        _cut_query_tiles(ROW2, Q02, Q12, g, n_q, slots2, order, ((rem > 0) & (rem <= BM2)).to(tl.int64),
                         start + size // BM1 * BM1, start + size, last, BM2, BLOCK_S)


@triton.jit
def select_key_clusters(LOGITS, K_SIZES, FLOOR, MASK, n_q, n_k, top_p, scale, BLOCK_K: tl.constexpr):
    """SVOO block selection of row ``r = program_id(0)`` (query cluster ``r % n_q`` of group ``g = r // n_q``).

    LOGITS float32 ``[R, n_k]`` (centroid dot products, unscaled), K_SIZES int64 ``[G, n_k]``, FLOOR int64
    ``[G]``; writes MASK bool ``[R, n_k]``. Mass ``M_j ∝ |K_j| exp(scale * logit_j)``; keeps the key clusters of
    the smallest descending prefix (ties: lower index first) whose mass before it is <= ``top_p``, at least
    ``FLOOR[g]`` of them, never an empty one.
    """
    r = tl.program_id(0).to(tl.int64)
    g = r // n_q
    j = tl.arange(0, BLOCK_K)
    ok = j < n_k
    size = tl.load(K_SIZES + g * n_k + j, mask=ok, other=0)
    z = tl.load(LOGITS + r * n_k + j, mask=ok, other=0.0) * scale + tl.log(tl.maximum(size, 1).to(tl.float32))
    z = tl.where(ok & (size > 0), z, float("-inf"))
    e = tl.exp(z - tl.max(z, 0))
    mass = e / tl.sum(e, 0)
    key = mass.to(tl.int32, bitcast=True).to(tl.int64) * BLOCK_K + (BLOCK_K - 1 - j)  # mass >= 0: bits sort as floats
    key = tl.where(ok, key, -1)
    ranked_key = tl.sort(key, descending=True)
    ranked = (ranked_key // BLOCK_K).to(tl.int32).to(tl.float32, bitcast=True)
    before = tl.cumsum(ranked, 0) - ranked  # mass of the clusters ranked ahead
    keep = tl.sum(((before <= top_p) & ok).to(tl.int32), 0)  # before[0] = 0: at least one
    keep = tl.minimum(tl.maximum(keep.to(tl.int64), tl.load(FLOOR + g)), n_k)
    last = tl.sum(tl.where(j == keep - 1, ranked_key, 0), 0)
    tl.store(MASK + r * n_k + j, (key >= last) & (size > 0), mask=ok)
