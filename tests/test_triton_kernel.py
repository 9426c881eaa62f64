"""The real Triton kernel against the reference.

Without CUDA these run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1), in fp16/fp32
(bf16 ``tl.dot`` is wrong in the interpreter); on a CUDA machine they run on the GPU and add bf16.
"""
import pytest
import torch

from lvsa_kernels import BackendUnavailable, BlockSparseLayout, LVSAPattern, block_sparse_attn, reference_attention
from lvsa_kernels.triton_src.launch import run_scheduled
from lvsa_kernels.triton_src.schedule import build_schedule
from lvsa_kernels.triton_src.tuning import INTERPRETER_CONFIG, KernelConfig

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if CUDA else [])
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_qkv(B, Sq, Skv, H, Hkv, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Sq, H, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(B, Skv, Hkv, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, Skv, Hkv, D, generator=g).to(DEVICE, dtype)
    return q, k, v


def random_layout(seed, heads=1, nqb=6, nkb=7, max_block=23, per_head_sizes=False, p=0.45):
    """Random ragged layout: block sizes 0..max_block, some rows empty."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(heads, nqb, nkb, generator=g) < p
    mask[:, 0] = False                      # an empty row
    mask[:, 1] = True                       # a dense row (long span)
    size_heads = heads if per_head_sizes else 1
    qs = torch.randint(1, max_block + 1, (size_heads, nqb), generator=g)
    ks = torch.randint(0, max_block + 1, (size_heads, nkb), generator=g)
    if per_head_sizes:  # all heads must cover the same number of tokens: rescale the last block
        qs[:, -1] += qs.sum(1).max() - qs.sum(1)
        ks[:, -1] += ks.sum(1).max() - ks.sum(1)
    return BlockSparseLayout.from_block_mask(mask if heads > 1 else mask[0], qs, ks)


def check(q, k, v, layout, scale=None):
    out, lse = block_sparse_attn(q, k, v, layout, backend="triton", scale=scale, return_lse=True)
    ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), layout, scale=scale, return_lse=True)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= TOL[q.dtype], rel_err(out, ref)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert torch.allclose(lse[finite].double(), ref_lse[finite].double(), atol=1e-3 if q.dtype != torch.float32 else 1e-5)
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("text_position", ["after", "before"])
def test_lvsa_layout_with_text(dtype, text_position):
    layout = LVSAPattern(window=1, reference_frames=3, key_frame_interval=3).plan(
        7, 19, step=1, text_tokens=11, text_position=text_position)
    assert 0 < layout.density < 1
    check(*make_qkv(1, layout.q_len, layout.kv_len, 2, 2, 32, dtype, seed=1), layout)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ragged_blocks_empty_rows_gqa_batch2(dtype):
    layout = random_layout(seed=2)
    q, k, v = make_qkv(2, layout.q_len, layout.kv_len, 4, 2, 16, dtype, seed=3)
    out, lse = check(q, k, v, layout)
    empty_rows = slice(0, int(layout.q_offsets[0, 1]))
    assert (out[:, empty_rows] == 0).all()
    assert torch.isneginf(lse[:, :, empty_rows]).all()


def test_per_head_layout_with_per_head_block_sizes():
    layout = random_layout(seed=4, heads=3, per_head_sizes=True)
    assert layout.num_heads == 3 and layout.q_offsets.shape[0] == 3
    check(*make_qkv(2, layout.q_len, layout.kv_len, 3, 1, 16, torch.float32, seed=5), layout)


def test_strided_inputs_and_custom_scale():
    layout = random_layout(seed=6)
    B, H, D = 2, 2, 32
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, layout.q_len, H, 2 * D, generator=g).to(DEVICE, torch.float16)[..., :D]
    kv = torch.randn(B, layout.kv_len, 2, H, D, generator=g).to(DEVICE, torch.float16)
    k, v = kv[:, :, 0], kv[:, :, 1]  # views into a fused projection
    assert not q.is_contiguous() and not k.is_contiguous()
    check(q, k, v, layout, scale=0.37)


@pytest.mark.parametrize("use_tma", [False, True])
def test_every_output_element_is_written(use_tma):
    """Both load paths (pointers, tensor descriptors), into a NaN-poisoned output."""
    layout = random_layout(seed=8)
    q, k, v = make_qkv(2, layout.q_len, layout.kv_len, 2, 2, 16, torch.float32, seed=9)
    cfg = INTERPRETER_CONFIG if not CUDA else KernelConfig(64, 64, 4, 2)
    cfg = KernelConfig(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, use_tma)
    if use_tma and CUDA and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need Hopper")
    sched = build_schedule(layout, cfg.block_m, q.device)
    out = torch.full_like(q, float("nan"))
    out, lse = run_scheduled(q, k, v, sched, False, q.shape[-1] ** -0.5, cfg, out=out)
    ref = reference_attention(q, k, v, layout)
    assert not torch.isnan(out).any()
    assert rel_err(out, ref) <= 2e-5


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # rows that do read the NaN keys
@pytest.mark.parametrize("use_tma", [False, True])
def test_keys_outside_the_layout_never_reach_the_output(use_tma):
    """NaN/inf in key and value rows that no query block selects must not leak through span tails."""
    layout = BlockSparseLayout.from_block_mask(torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.bool), [20, 20], [13, 9, 11])
    q, k, v = make_qkv(1, 40, 33, 2, 2, 16, torch.float32, seed=21)
    ref = reference_attention(q, k, v, layout)
    k[:, 13:22], v[:, 13:22] = float("nan"), float("inf")     # key block 1: only query block 1 reads it ...
    ref[:, 20:] = float("nan")                                 # ... so only its rows may change
    cfg = INTERPRETER_CONFIG if not CUDA else KernelConfig(64, 64, 4, 2)
    if use_tma and CUDA and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need Hopper")
    cfg = KernelConfig(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, use_tma)
    out, _ = run_scheduled(q, k, v, build_schedule(layout, cfg.block_m, q.device), False, 0.25, cfg)
    assert torch.isfinite(out[:, :20]).all()
    assert rel_err(out[:, :20], reference_attention(q, k, v, layout, scale=0.25)[:, :20]) <= 2e-5


def test_schedule_tiles_cover_each_query_token_once_heaviest_first():
    layout = random_layout(seed=10, heads=2, per_head_sizes=True, nqb=5, nkb=9, max_block=40)
    bm = 16
    s = build_schedule(layout, bm, torch.device("cpu"))
    token_mask = layout.to_token_mask()
    for h in range(layout.num_heads):
        t0, t1 = int(s.tile_ptr[h]), int(s.tile_ptr[h + 1])
        covered = torch.zeros(layout.q_len, dtype=torch.int64)
        work = []
        for t in range(t0, t1):
            row = int(s.tile_row[t])
            a, b = int(s.tile_start[t]), int(s.tile_end[t])
            assert 0 < b - a <= bm
            assert (token_mask[h, a:b] == token_mask[h, a]).all(), "a tile may only span rows with identical keys"
            covered[a:b] += 1
            cols = torch.zeros(layout.kv_len, dtype=torch.bool)
            for i in range(int(s.span_ptr[row]), int(s.span_ptr[row + 1])):
                cols[int(s.span_start[i]):int(s.span_end[i])] = True
            assert torch.equal(cols, token_mask[h, a]), "the row's spans are exactly the tile's keys"
            work.append(int(cols.sum()))
        assert torch.equal(covered, torch.ones_like(covered)), "every query token in exactly one tile"
        assert work == sorted(work, reverse=True), "heaviest tiles first"


def test_blocks_with_identical_spans_share_tiles():
    layout = BlockSparseLayout.from_block_mask(torch.ones(4, 3, dtype=torch.bool), [10, 10, 10, 10], [7, 7, 7])
    s = build_schedule(layout, 16, torch.device("cpu"))
    assert s.max_tiles == 3  # 40 rows of one run -> ceil(40 / 16) tiles, not 4 * ceil(10 / 16)
    check(*make_qkv(1, 40, 21, 2, 2, 16, torch.float32, seed=19), layout)


def test_runs_stop_at_empty_blocks_heads_and_differing_spans():
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    layout = BlockSparseLayout.from_block_mask(torch.stack([mask, mask]), [[8, 8, 0, 8, 8]] * 2, [[5, 6, 7]] * 2)
    s = build_schedule(layout, 16, torch.device("cpu"))
    tiles = sorted(zip(s.tile_start.tolist(), s.tile_end.tolist()))
    # per head: rows 0-1 merge (16 tokens, one tile); the empty block 2 ends the run; row 3 alone; row 4 differs
    assert tiles == sorted([(0, 16), (16, 24), (24, 32)] * 2)
    check(*make_qkv(1, 32, 18, 2, 2, 16, torch.float32, seed=20), layout)


def test_dense_layout_matches_sdpa():
    layout = BlockSparseLayout.dense(70, 90)
    q, k, v = make_qkv(1, 70, 90, 2, 1, 64, torch.float16, seed=11)
    out = block_sparse_attn(q, k, v, layout, backend="triton")
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float(), enable_gqa=True).transpose(1, 2)
    assert rel_err(out, ref) <= 2e-3


def test_torch_compile_fullgraph_traces_through_the_custom_op():
    layout = random_layout(seed=12)
    q, k, v = make_qkv(1, layout.q_len, layout.kv_len, 2, 2, 16, torch.float32, seed=13)
    block_sparse_attn(q, k, v, layout, backend="triton")  # eager first: tune/schedule caches filled

    @torch.compile(fullgraph=True, backend="eager" if not CUDA else "inductor")
    def f(q, k, v):
        return block_sparse_attn(q, k, v, layout, backend="triton") * 2.0

    out = f(q, k, v)
    ref = reference_attention(q, k, v, layout) * 2.0
    assert rel_err(out, ref) <= 2e-5


def test_fake_impl_gives_shapes_under_fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    layout = random_layout(seed=14)
    s = build_schedule(layout, 16, torch.device(DEVICE))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        q = mode.from_tensor(torch.empty(2, layout.q_len, 4, 32, device=DEVICE))
        k = mode.from_tensor(torch.empty(2, layout.kv_len, 2, 32, device=DEVICE))
        out, lse = torch.ops.lvsa_kernels.triton_block_sparse_fwd(
            q, k, k, *s.tensors(), s.max_tiles, False, 0.1, 16, 16, 1, 1, False, False)
    assert out.shape == (2, layout.q_len, 4, 32) and lse.shape == (2, 4, layout.q_len)
    assert lse.dtype == torch.float32


def test_unsupported_inputs_raise_clear_errors():
    layout = random_layout(seed=15)
    q, k, v = make_qkv(1, layout.q_len, layout.kv_len, 2, 2, 24, torch.float32, seed=16)
    with pytest.raises(BackendUnavailable, match="head dims"):
        block_sparse_attn(q, k, v, layout, backend="triton")
    if not CUDA:
        q, k, v = make_qkv(1, layout.q_len, layout.kv_len, 2, 2, 16, torch.bfloat16, seed=17)
        with pytest.raises(BackendUnavailable, match="bf16"):
            block_sparse_attn(q, k, v, layout, backend="triton")
    q, k, v = make_qkv(1, layout.q_len, layout.kv_len, 2, 2, 32, torch.float32, seed=18)
    check(q[..., ::2], k[..., ::2], v[..., ::2], layout)  # a strided head dim is copied (api.py), not refused
