"""The warp-specialised Gluon kernel (sm_90) against the float64 reference, every Hopper launch config.

The CPU interpreter cannot run Gluon kernels: without an sm_90 GPU only the key-tile list it reads is
checked here; the kernel tests run on the GPU (their log is committed under bench/results/).
"""
import pytest
import torch

from lvsa_kernels import BlockSparseLayout, LVSAPattern, reference_attention
from lvsa_kernels.triton_src.launch import hopper_kernel_available, hopper_refusal, run_scheduled
from lvsa_kernels.triton_src.schedule import build_key_tiles, build_schedule
from lvsa_kernels.triton_src.tuning import hopper_configs

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and hopper_kernel_available()
needs_hopper = pytest.mark.skipif(not HOPPER, reason="the Gluon kernel runs on sm_90 GPUs with a verified Triton")
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def ragged_layout(seed, heads=1, nqb=5, nkb=6, max_block=300):
    """Blocks of 0..max_block tokens (key spans of several tiles plus ragged tails), an empty and a dense row."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(heads, nqb, nkb, generator=g) < 0.5
    mask[:, 0] = False
    mask[:, 1] = True
    qs = torch.randint(1, max_block + 1, (nqb,), generator=g)
    ks = torch.randint(0, max_block + 1, (nkb,), generator=g)
    return BlockSparseLayout.from_block_mask(mask if heads > 1 else mask[0], qs, ks)


@pytest.mark.parametrize("precision", ["exact", "int8_qk", "fp8"])
def test_key_tiles_cover_each_rows_spans_exactly(precision):
    layout = ragged_layout(seed=1, heads=2)
    for bn in (64, 128):
        kt = build_key_tiles(layout, bn, torch.device("cpu"), precision)
        assert kt.aligned == (precision != "exact")
        assert kt.short_n in ((0,) if precision == "fp8" else (0, bn // 4, bn // 2))
        sp = layout.spans
        span_ptr = torch.cat([sp.ptr[:, :-1].reshape(-1), sp.ptr[-1:, -1]])
        for row in range(span_ptr.numel() - 1):
            want = torch.zeros(layout.kv_len, dtype=torch.int64)
            for i in range(int(span_ptr[row]), int(span_ptr[row + 1])):
                want[int(sp.start[i]):int(sp.end[i])] = 1
            got = torch.zeros(layout.kv_len, dtype=torch.int64)
            kinds = []
            for t in range(int(kt.row_ptr[row]), int(kt.row_ptr[row + 1])):
                a, b = int(kt.start[t]), int(kt.end[t])
                assert 0 < b - a <= bn
                if kt.aligned:
                    assert a // bn == (b - 1) // bn, "an aligned tile stays inside one block of bn tokens"
                got[a:b] += 1
                kinds.append(0 if b - a == bn else 1 if b - a > kt.short_n else 2)
            assert torch.equal(got, want), "key tiles cover the row's keys exactly once"
            assert kinds == sorted(kinds), "full tiles first, then the ragged ones, then the short ones"
            assert len(kinds) - kinds.count(0) == int(kt.row_masked[row]), "the masked tiles are the last"
            if precision != "fp8":
                assert 1 not in kinds, "outside fp8 no tile is ragged: the masked tiles are the short ones"


@pytest.mark.parametrize("built, run", [("fp8", "int8_qk"), ("int8_qk", "fp8"), ("exact", "int8_qk"),
                                        ("int8_qk", "exact")])
def test_key_tiles_built_for_another_precision_are_refused(built, run):
    """fp8's tiles keep ragged pieces for a masked walk the other modes do not compile: run under int8_qk they
    would drop those keys, so the launch check refuses them (and every other mismatch)."""
    from lvsa_kernels.triton_src.launch import check_launch

    layout, cpu = ragged_layout(seed=1, heads=2), torch.device("cpu")
    sched, cfg = build_schedule(layout, 128, cpu), hopper_configs(128, run)[0]
    with pytest.raises(ValueError, match="built for another precision"):
        check_launch(sched, build_key_tiles(layout, 128, cpu, built), cfg, run)
    check_launch(sched, build_key_tiles(layout, 128, cpu, run), cfg, run)


def short_rows_layout():
    """Rows 0 and 1 attend four separate 20-30-key spans each (only short tiles, under ping-pong: 100 and 128
    query rows), row 2 one 204-key span (a full tile, then its 76-key rest as three short tiles)."""
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, ::2] = mask[1, 1::2] = mask[2] = True
    return BlockSparseLayout.from_block_mask(mask, [100, 128, 70], [24, 30, 20, 28, 26, 22, 29, 25])


def test_key_tiles_are_the_fake_quant_references_walk():
    """Row by row, the Hopper kernel's key tiles are `reference.fp8._walk` with the same options (the 8-bit
    fake-quant reference then folds keys in the kernel's order)."""
    from lvsa_kernels.reference.fp8 import _walk

    for layout in (ragged_layout(seed=1, heads=2), short_rows_layout(), LVSAPattern(window=4).plan(9, 1560)):
        for precision in ("exact", "int8_qk", "fp8"):
            kt = build_key_tiles(layout, 128, torch.device("cpu"), precision)
            sp = layout.spans
            span_ptr = torch.cat([sp.ptr[:, :-1].reshape(-1), sp.ptr[-1:, -1]])
            for row in range(span_ptr.numel() - 1):
                lo, hi = int(span_ptr[row]), int(span_ptr[row + 1])
                want = _walk(sp.start[lo:hi], sp.end[lo:hi], 128, kt.aligned, kt.short_n)
                tiles = range(int(kt.row_ptr[row]), int(kt.row_ptr[row + 1]))
                assert [(int(kt.start[t]), int(kt.end[t])) for t in tiles] == want, (precision, row)


def test_short_tiles_take_the_width_that_loads_fewer_keys():
    layout = LVSAPattern(window=4).plan(31, 1560, step=0)  # 1560 = 12 * 128 + 24: 24-key tails
    assert build_key_tiles(layout, 128, torch.device("cpu")).short_n == 32
    assert build_key_tiles(layout, 128, torch.device("cpu"), "fp8").short_n == 0
    whole_blocks = LVSAPattern(window=4).plan(31, 1536, step=0)  # every span a multiple of 128 keys
    assert build_key_tiles(whole_blocks, 128, torch.device("cpu")).short_n == 0
    kt = build_key_tiles(short_rows_layout(), 128, torch.device("cpu"))
    assert kt.short_n == 32 and kt.row_masked.tolist() == [4, 4, 3]
    # a 100-key rest: two 64-key tiles load as many keys as four 32-key ones, in fewer tiles
    hundreds = BlockSparseLayout.from_block_mask(torch.ones(1, 1, dtype=torch.bool), [64], [228])
    assert build_key_tiles(hundreds, 128, torch.device("cpu")).short_n == 64


def run_hopper(q, k, v, layout, scale, cfg, poison=True):
    sched = build_schedule(layout, cfg.block_m, q.device)
    tiles = build_key_tiles(layout, cfg.block_n, q.device)
    out = torch.full_like(q, float("nan")) if poison else None
    return run_scheduled(q, k, v, sched, layout.num_heads > 1, scale, cfg, out=out, key_tiles=tiles)


def check(q, k, v, layout, cfg, scale=None, poison=True):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    assert hopper_refusal(q, k, v) is None
    out, lse = run_hopper(q, k, v, layout, scale, cfg, poison)
    ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), layout, scale=scale, return_lse=True)
    assert not torch.isnan(out).any(), "every output element written, none NaN"
    assert rel_err(out, ref) <= TOL[q.dtype], (cfg, rel_err(out, ref))
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert torch.allclose(lse[finite].double(), ref_lse[finite].double(), atol=2e-3)
    return out, lse


def qkv(B, Sq, Skv, H, Hkv, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, S, h, D, generator=g).to("cuda", dtype) for S, h in ((Sq, H), (Skv, Hkv), (Skv, Hkv)))


CONFIGS = [(d, c) for d in (64, 128) for c in hopper_configs(d)]


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim,cfg", CONFIGS, ids=[f"d{d}-{c.block_n}x{c.num_stages}" for d, c in CONFIGS])
def test_ragged_spans_empty_rows_gqa_batch2(dtype, head_dim, cfg):
    layout = ragged_layout(seed=2)
    out, lse = check(*qkv(2, layout.q_len, layout.kv_len, 4, 2, head_dim, dtype, seed=3), layout, cfg)
    empty = slice(0, int(layout.q_offsets[0, 1]))
    assert (out[:, empty] == 0).all() and torch.isneginf(lse[:, :, empty]).all()


@needs_hopper
@pytest.mark.parametrize("cfg", hopper_configs(128), ids=str)
@pytest.mark.parametrize("text_position", ["after", "before"])
def test_lvsa_layout_with_text(cfg, text_position):
    layout = LVSAPattern(window=2, reference_frames=5, key_frame_interval=3).plan(
        9, 200, step=2, text_tokens=77, text_position=text_position)
    check(*qkv(1, layout.q_len, layout.kv_len, 3, 3, 128, torch.bfloat16, seed=4), layout, cfg)


@needs_hopper
@pytest.mark.parametrize("cfg", hopper_configs(128), ids=str)
def test_per_head_layout(cfg):
    layout = ragged_layout(seed=5, heads=3)
    check(*qkv(1, layout.q_len, layout.kv_len, 3, 1, 128, torch.bfloat16, seed=6), layout, cfg)


@needs_hopper
@pytest.mark.parametrize("cfg", hopper_configs(128), ids=str)
def test_tiles_of_at_most_64_rows(cfg):
    """Query tiles of 1..64 rows (one busy consumer) with 0 to 5 key tiles (odd and even counts, ragged
    tails), an empty row, GQA, batch 2."""
    mask = torch.rand(8, 8, generator=torch.Generator().manual_seed(14)) < 0.5
    mask[0] = False
    mask[1] = True
    sizes = ([1, 24, 63, 64, 40, 7, 33, 64], [0, 100, 128, 300, 1, 257, 64, 500])  # query / key blocks, tokens
    layout = BlockSparseLayout.from_block_mask(mask, *sizes)
    out, lse = check(*qkv(2, layout.q_len, layout.kv_len, 4, 2, 128, torch.bfloat16, seed=15), layout, cfg)
    assert (out[:, :1] == 0).all() and torch.isneginf(lse[:, :, :1]).all()


@needs_hopper
@pytest.mark.parametrize("cfg", hopper_configs(128), ids=str)
def test_rows_of_short_tiles_only(cfg):
    layout = short_rows_layout()
    check(*qkv(2, layout.q_len, layout.kv_len, 4, 2, 128, torch.bfloat16, seed=16), layout, cfg)


@needs_hopper
@pytest.mark.parametrize("scale", [-0.3, 0.0, 0.05, 3.0])
def test_strided_inputs_and_any_scale(scale):
    layout = ragged_layout(seed=7)
    B, H, D = 2, 2, 128
    g = torch.Generator().manual_seed(8)
    q = torch.randn(B, layout.q_len, H, 2 * D, generator=g).to("cuda", torch.bfloat16)[..., D:]
    k, v = torch.randn(B, layout.kv_len, 2, H, D, generator=g).to("cuda", torch.bfloat16).unbind(2)
    assert not q.is_contiguous() and not k.is_contiguous()  # views of fused projections
    check(q, k, v, layout, hopper_configs(128)[0], scale=scale)


@needs_hopper
def test_keys_outside_the_layout_never_reach_the_output():
    layout = BlockSparseLayout.from_block_mask(torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.bool),
                                               [150, 90], [130, 100, 77])
    q, k, v = qkv(1, 240, 307, 2, 2, 128, torch.bfloat16, seed=9)
    k[:, 130:230], v[:, 130:230] = float("nan"), float("inf")  # key block 1: only query block 1 reads it
    for cfg in hopper_configs(128):
        out, _ = run_hopper(q, k, v, layout, 0.1, cfg)
        assert torch.isfinite(out[:, :150]).all(), cfg
        ref = reference_attention(q.double(), k.double(), v.double(), layout, scale=0.1)
        assert rel_err(out[:, :150], ref[:, :150]) <= 1e-2, cfg


@needs_hopper
def test_long_lvsa_rows_match_the_portable_kernel():
    """A Wan-like layout (1560-token frames: 24-row remainder tiles, spans of many tiles) against the portable kernel."""
    from lvsa_kernels.triton_src.tuning import KernelConfig

    layout = LVSAPattern(window=3).plan(13, 1560, step=1)
    assert build_key_tiles(layout, 128, torch.device("cpu")).short_n > 0  # the spans' 24-120-key tails run short
    q, k, v = qkv(1, layout.q_len, layout.kv_len, 2, 2, 128, torch.bfloat16, seed=10)
    portable = KernelConfig(128, 64, 8, 3)
    ref, ref_lse = run_scheduled(q, k, v, build_schedule(layout, 128, q.device), False, 0.088, portable)
    for cfg in hopper_configs(128):
        out, lse = run_hopper(q, k, v, layout, 0.088, cfg)
        assert rel_err(out, ref) <= 5e-3, cfg
        assert torch.allclose(lse, ref_lse, atol=1e-3), cfg


@needs_hopper
def test_custom_op_path_and_repeatable_results():
    """Through the custom op (no ``out=``), many past-the-end programs (per-head layouts with unequal tile
    counts), one- and two-tile rows: every run gives bitwise the same output (no races)."""
    g = torch.Generator().manual_seed(11)
    mask = torch.rand(4, 6, 6, generator=g) < 0.4
    mask[0] = True                                   # head 0: every row dense (many tiles)
    mask[1] = torch.eye(6, dtype=torch.bool)         # head 1: one key block per row (1-2 key tiles)
    mask[2, :, 1:] = False                           # head 2: only key block 0 (n_kv small), some rows empty
    layout = BlockSparseLayout.from_block_mask(mask, [100, 300, 20, 64, 129, 250], [100, 300, 20, 64, 129, 250])
    q, k, v = qkv(2, layout.q_len, layout.kv_len, 4, 4, 128, torch.bfloat16, seed=12)
    ref = reference_attention(q.double(), k.double(), v.double(), layout, scale=0.09)
    for cfg in hopper_configs(128):
        sched = build_schedule(layout, cfg.block_m, q.device)
        tiles = build_key_tiles(layout, cfg.block_n, q.device)
        first, _ = run_scheduled(q, k, v, sched, True, 0.09, cfg, key_tiles=tiles)
        assert rel_err(first, ref) <= 1e-2, cfg
        for _ in range(10):
            again, _ = run_scheduled(q, k, v, sched, True, 0.09, cfg, key_tiles=tiles)
            assert torch.equal(again, first), cfg


@needs_hopper
def test_block_sparse_attn_runs_the_hopper_kernel_by_default(isolated_dispatch_cache):
    from lvsa_kernels import block_sparse_attn
    from lvsa_kernels.backends.triton_backend import config_for

    layout = LVSAPattern(window=1).plan(5, 300, step=0)
    q, k, v = qkv(1, layout.q_len, layout.kv_len, 2, 2, 128, torch.bfloat16, seed=13)
    out = block_sparse_attn(q, k, v, layout, backend="triton")
    assert config_for(q, k, v, layout, 128 ** -0.5).kernel == "hopper"  # the default when autotuning is off
    ref = reference_attention(q.double(), k.double(), v.double(), layout)
    assert rel_err(out, ref) <= 1e-2
    misaligned = torch.empty(q.numel() + 8, dtype=q.dtype, device="cuda")[1:1 + q.numel()].view_as(q).copy_(q)
    assert hopper_refusal(misaligned, k, v) is not None  # an odd-element view: no TMA, the portable kernel runs
    assert config_for(misaligned, k, v, layout, 128 ** -0.5).kernel == "portable"
    assert rel_err(block_sparse_attn(misaligned, k, v, layout, backend="triton"), ref) <= 1e-2
