"""The SVOO cluster schedule built with plain tensor ops and a Python walk: the oracle of the Triton planner
(`lvsa_kernels.triton_src.cluster_plan`), compared bit for bit on the integer outputs that the kernel reads."""
from typing import List, Sequence, Tuple

import torch
from torch import Tensor


def _exclusive_cumsum(x: Tensor) -> Tensor:
    return torch.nn.functional.pad(torch.cumsum(x, dim=-1), (1, 0))


def segments(mask: Tensor, k_sizes: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(seg_cum [R, n_k + 1], seg_delta [R, n_k], keys_per_row [R])``: packed start column of each row's
    selected non-empty key clusters (then the total) and KP row minus column of each (then -total)."""
    G, n_q, n_k = mask.shape
    sel = (mask & (k_sizes > 0).unsqueeze(1)).reshape(G * n_q, n_k)
    sizes = k_sizes.repeat_interleave(n_q, dim=0)
    starts = _exclusive_cumsum(k_sizes)[:, :-1].repeat_interleave(n_q, dim=0)
    seg_cum = torch.zeros(G * n_q, n_k + 1, dtype=torch.int64)
    seg_delta = torch.zeros(G * n_q, n_k, dtype=torch.int64)
    for r in range(G * n_q):
        lens, st = sizes[r][sel[r]], starts[r][sel[r]]
        cum = _exclusive_cumsum(lens)
        total = cum[-1]
        seg_cum[r] = total
        seg_cum[r, :lens.numel()] = cum[:-1]
        seg_delta[r] = -total
        seg_delta[r, :lens.numel()] = st - cum[:-1]
    return seg_cum, seg_delta, seg_cum[:, -1].clone()


def key_tiles(seg_cum: Tensor, seg_delta: Tensor, block_n: int, window: int) -> List[Tuple[list, list]]:
    """Per row ``(full records, partial records)`` of the greedy cut (records as lists, see `plan_key_tiles`)."""
    out = []
    for cum, dl in zip(seg_cum.tolist(), seg_delta.tolist()):
        pad = len(cum) + window
        cum = cum + [cum[-1]] * window
        dl = dl + [-cum[-1]] * (pad - len(dl))
        total, c0, s0, full, part = cum[-1], 0, 0, [], []
        while c0 < total:
            c1 = min(c0 + block_n, cum[s0 + window])
            rec = [c0, c1, dl[s0]]
            for w in range(1, window):
                rec += [cum[s0 + w], dl[s0 + w] - dl[s0 + w - 1]]
            (full if c1 - c0 == block_n else part).append(rec)
            s0 += sum(cum[s0 + a] <= c1 for a in range(1, window + 1))
            c0 = c1
        out.append((full, part))
    return out


def query_tiles(keys_per_row: Tensor, q_sizes: Tensor, tiles: Sequence[Tuple[int, int]]) -> List[Tuple[Tensor, ...]]:
    """``(row, q0, q1)`` int64 ``[G, slots]`` per launch (the tensor-op planner that the Triton one replaced)."""
    G, n_q = q_sizes.shape
    S = int(q_sizes[0].sum())
    order = torch.argsort(keys_per_row.view(G, n_q), dim=1, descending=True, stable=True)
    sizes = q_sizes.gather(1, order)
    q_start = _exclusive_cumsum(q_sizes).gather(1, order)
    bm = tiles[0][0]
    small = tiles[1][0] if len(tiles) == 2 else 0
    rem = sizes % bm
    parts = [_cut(order, sizes, q_start, sizes // bm + (rem > small).long(), bm, S // bm + n_q)]
    if small:
        parts.append(_cut(order, sizes, q_start, ((rem > 0) & (rem <= small)).long(), small, n_q,
                          first=sizes // bm * bm))
    return parts


def _cut(order, sizes, q_start, count, block_m, slots, first=None):
    G, n_q = order.shape
    tiles_end = torch.cumsum(count, dim=1)
    slot = torch.arange(slots).expand(G, slots).contiguous()
    which = torch.searchsorted(tiles_end, slot, right=True)
    used = which < n_q
    which = which.clamp(max=n_q - 1)
    local = slot - (tiles_end.gather(1, which) - count.gather(1, which))
    lo = q_start.gather(1, which) + (0 if first is None else first.gather(1, which))
    q0 = lo + local * block_m
    q1 = torch.minimum(q0 + block_m, q_start.gather(1, which) + sizes.gather(1, which))
    row = torch.arange(G).unsqueeze(1) * n_q + order.gather(1, which)
    return row, torch.where(used, q0, 0), torch.where(used, q1, 0)
