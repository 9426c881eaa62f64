"""Inputs and error metrics shared by the 8-bit (``precision="fp8"`` / ``"int8_qk"``) tests and bench.

``python tests/fp8_cases.py [--aligned]`` prints docs/fp8.md's CPU accuracy table (fake-quant reference vs
float32 attention; ``--aligned``: with the Hopper kernel's key walk); ``--pv`` its table of P V roundings."""
import sys

import torch

from lvsa_kernels import BlockSparseLayout, LVSAPattern


def distribution(name, B, S, H, Hkv, D, seed):
    """q ``[B, S, H, D]``, k, v ``[B, S, Hkv, D]`` float32 on CPU: ``normal`` (N(0, 1)), ``peaked`` (q and k
    drawn around 8 shared cluster centres, so each query's softmax mass sits on one cluster's keys), or
    ``kbias`` (normal, plus a bias of 30 on 4 key channels: what smoothing K removes)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    if name == "normal":
        return randn(B, S, H, D), randn(B, S, Hkv, D), randn(B, S, Hkv, D)
    if name == "peaked":
        centres = randn(8, D)
        pick = lambda h: centres[torch.randint(0, 8, (B, S, h), generator=g)]  # noqa: E731
        return pick(H) + 0.5 * randn(B, S, H, D), pick(Hkv) + 0.5 * randn(B, S, Hkv, D), randn(B, S, Hkv, D)
    if name == "kbias":
        bias = torch.zeros(D)
        bias[:4] = 30.0
        return randn(B, S, H, D), randn(B, S, Hkv, D) + bias, randn(B, S, Hkv, D)
    raise ValueError(f"distribution: unknown {name!r}")


def _aligned_blocks():
    mask = torch.rand(8, 7, generator=torch.Generator().manual_seed(5)) < 0.5
    mask[0] = False                                  # no keys
    mask[1] = torch.arange(7) == 3                   # one full tile
    mask[2] = (torch.arange(7) == 1) | (torch.arange(7) == 5)   # two, from two spans
    mask[3] = True                                   # seven: three pairs and one left over
    return BlockSparseLayout.from_block_mask(mask, [40, 64, 100, 128, 130, 170, 190, 150], [128] * 7)


def layouts():
    """Named layouts: LVSA with text after the video, long rows (T=121, window 3), wide frames (31 frames of 100
    tokens, text after them), key blocks of 128 tokens (aligned blocks: rows of 0 to 7 full fp8 key tiles and
    no masked ones), and ragged blocks with empty query rows and an empty key block."""
    mask = torch.rand(6, 7, generator=torch.Generator().manual_seed(3)) < 0.5
    mask[0] = False   # a query block with no keys
    mask[1] = True    # a dense row
    return {
        "text": LVSAPattern(window=3, n_first=1, reference_frames=13).plan(13, 16, step=1, text_tokens=24),
        "long_rows": LVSAPattern(window=3, n_first=1, reference_frames=21).plan(121, 4, step=0),
        # frames of 100 tokens: spans of several aligned 128-key blocks, so the fp8 walk pairs full tiles
        "wide_frames": LVSAPattern(window=3, n_first=1, reference_frames=21).plan(31, 100, step=1, text_tokens=24),
        # key blocks of 128 tokens: every fp8 key tile is full (no masked walk), rows hold 0-7 of them
        "aligned_blocks": _aligned_blocks(),
        "empty_rows": BlockSparseLayout.from_block_mask(mask, [20, 64, 17, 30, 33, 40], [30, 0, 50, 41, 22, 25, 36]),
    }


def errors(out, ref):
    """``(relative L2, median row cosine, worst row cosine)`` of ``out`` against ``ref`` over rows whose
    reference is non-zero (rows without keys are checked separately)."""
    o, r = out.double().reshape(-1, out.shape[-1]), ref.double().reshape(-1, ref.shape[-1])
    rows = r.norm(dim=1) > 0
    o, r = o[rows], r[rows]
    cos = torch.nn.functional.cosine_similarity(o, r, dim=1)
    return ((o - r).norm() / r.norm()).item(), cos.median().item(), cos.min().item()


def accuracy_table(aligned=False):
    """docs/fp8.md's accuracy rows: bf16 inputs, D=64, H=2, H_kv=1, seed 0, tiles 128 x 128."""
    from lvsa_kernels import reference_attention
    from lvsa_kernels.reference.fp8 import fp8_reference_attention

    from lvsa_kernels.triton_src.schedule import build_key_tiles

    def walk(layout, fp8):  # the Hopper kernel's 8-bit walk for this layout and mode, or the portable kernel's
        if not aligned:
            return {}
        tiles = build_key_tiles(layout, 128, torch.device("cpu"), "fp8" if fp8 else "int8_qk")
        return dict(aligned_tiles=True, short_n=tiles.short_n)

    cases = {"text": LVSAPattern(window=3, n_first=1, reference_frames=21).plan(21, 24, step=1, text_tokens=40),
             "long rows": LVSAPattern(window=3, n_first=1, reference_frames=21).plan(121, 8, step=0),
             "empty rows": layouts()["empty_rows"]}
    for name, layout in cases.items():
        for dist in ("normal", "peaked", "kbias"):
            q, k, v = (t.bfloat16() for t in distribution(dist, 1, layout.q_len, 2, 1, 64, seed=0))
            exact = reference_attention(q.float(), k.float(), v.float(), layout)
            cells = [errors(fp8_reference_attention(q, k, v, layout, block_m=128, block_n=128, fp8_pv=fp8,
                                                    **walk(layout, fp8)), exact) for fp8 in (True, False)]
            bf16 = errors(reference_attention(q, k, v, layout), exact)[0]
            print(f"| {name} (S={layout.q_len}) | {dist} | "
                  + " | ".join("%.2e / %.5f / %.5f" % c for c in cells) + f" | {bf16:.2e} |", flush=True)


def pv_rounding_table():
    """docs/fp8.md's P V rounding rows: the error of ``P V / rowsum(P)`` with P (= exp(s - row max), exact
    float64 scores) and V rounded to each candidate format, vs float64, for 256 queries against 1560 or 14040
    keys (one or nine 1560-token frames), head dim 128, seed 1. e4m3: P x 448, V per channel to 448; u8 / s8:
    P x 255 / 127, V per channel to 127; bf16: plain casts."""
    def e4m3(x):
        return x.float().to(torch.float8_e4m3fn).double()

    for dist in ("normal", "peaked"):
        for keys in (1560, 14040):
            q, k, v = (t[0, :, 0].double() for t in distribution(dist, 1, keys, 1, 1, 128, seed=1))
            s = q[:256] @ k.T / 128 ** 0.5
            p = torch.exp(s - s.amax(1, keepdim=True))
            v_s8 = v.abs().amax(0) / 127
            v_e4m3 = v.abs().amax(0) / 448
            formats = {
                "e4m3 P, e4m3 V": (e4m3(p * 448) / 448, e4m3(v / v_e4m3) * v_e4m3),
                "u8 P, s8 V": (torch.round(p * 255) / 255, torch.round(v / v_s8) * v_s8),
                "s8 P, s8 V": (torch.round(p * 127) / 127, torch.round(v / v_s8) * v_s8),
                "e4m3 P, bf16 V": (e4m3(p * 448) / 448, v.bfloat16().double()),
                "bf16 P, e4m3 V": (p.bfloat16().double(), e4m3(v / v_e4m3) * v_e4m3),
                "bf16 P, bf16 V": (p.bfloat16().double(), v.bfloat16().double()),
            }
            ref = p @ v / p.sum(1, keepdim=True)
            cells = []
            for pq, vq in formats.values():
                out = pq @ vq / p.sum(1, keepdim=True)
                cells.append(f"{((out - ref).norm() / ref.norm()).item():.2e}")
            print(f"| {dist} | {keys} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    if "--pv" in sys.argv[1:]:
        pv_rounding_table()
    else:
        accuracy_table(aligned="--aligned" in sys.argv[1:])
