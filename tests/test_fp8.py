"""8-bit attention (``precision="fp8"``: INT8 Q K^T, e4m3 P V; ``"int8_qk"``: INT8 Q K^T, P V in the input dtype).

CPU: the fake-quant reference against exact attention (the accuracy bound), the quantization pre-pass and
the kernel in Triton's interpreter against the fake-quant reference (identical roundings: tight), the
precision checks of the dispatcher and the plumbing of the diffusers shim. CUDA sm_89+: the kernel against
the fake-quant reference (tight) and float32 attention (the bound) in bf16 and fp16.
"""
import pytest
import torch

from fp8_cases import distribution, errors, layouts
from lvsa_kernels import BackendUnavailable, BlockSparseLayout, LVSAPattern, block_sparse_attn, reference_attention
from lvsa_kernels import dispatch
from lvsa_kernels.backends import get_backend
from lvsa_kernels.reference.fp8 import (KEY_QUANT_BLOCK, _steps, _walk, fp8_reference_attention, key_mean,
                                        quantize_int8, quantize_keys, value_channel_scale)

CUDA = torch.cuda.is_available()
FP8_GPU = CUDA and torch.cuda.get_device_capability() >= (8, 9)
DEVICE = "cuda" if CUDA else "cpu"
LAYOUTS = layouts()
# Measured (docs/fp8.md): e4m3 P and V cost ~3.6% relative L2 on zero-mean random V; INT8 Q K^T ~1.3%.
# int8_qk is held to the target (3e-2); fp8 misses it (open issue) and is held to its measured floor, a
# regression guard rather than the target.
BOUND = {"int8_qk": (3e-2, 0.999), "fp8": (4.5e-2, 0.999)}  # (max relative L2, min median row cosine)


def _check_bound(out, exact, mode):
    rel, median_cos, _ = errors(out, exact)
    max_rel, min_cos = BOUND[mode]
    assert rel <= max_rel and median_cos >= min_cos, (mode, rel, median_cos)


# ----------------------------------------------------------------------------------- fake-quant vs exact (CPU)
@pytest.mark.parametrize("mode", ["fp8", "int8_qk"])
@pytest.mark.parametrize("dist", ["normal", "peaked", "kbias"])
@pytest.mark.parametrize("layout_name", ["text", "empty_rows"])
def test_fake_quant_within_error_bound(layout_name, dist, mode):
    layout = LAYOUTS[layout_name]
    q, k, v = (t.bfloat16() for t in distribution(dist, 1, layout.q_len, 2, 1, 64, seed=1))
    exact = reference_attention(q.float(), k.float(), v.float(), layout)
    out = fp8_reference_attention(q, k, v, layout, block_m=128, block_n=64, fp8_pv=mode == "fp8")
    _check_bound(out, exact, mode)
    empty = exact.abs().amax(dim=(0, 2, 3)) == 0
    assert torch.equal(out[:, empty], torch.zeros_like(out[:, empty]))


def test_fake_quant_long_rows_within_error_bound():
    layout = LAYOUTS["long_rows"]  # T=121, window 3
    q, k, v = (t.bfloat16() for t in distribution("normal", 1, layout.q_len, 1, 1, 64, seed=2))
    exact = reference_attention(q.float(), k.float(), v.float(), layout)
    _check_bound(fp8_reference_attention(q, k, v, layout, block_m=64, block_n=128), exact, "fp8")


@pytest.mark.parametrize("layout_name,dist", [("long_rows", "normal"), ("empty_rows", "kbias")])
@pytest.mark.parametrize("mode", ["fp8", "int8_qk"])
def test_fake_quant_with_the_aligned_walk_within_error_bound(layout_name, dist, mode):
    """The Hopper kernel's 8-bit walk (tiles inside aligned 128-token blocks, short tiles last) keeps the bound
    on long rows (T=121) and on biased keys; it changes the summation order, not the result's accuracy."""
    from lvsa_kernels.triton_src.schedule import build_key_tiles

    layout = LAYOUTS[layout_name]
    q, k, v = (t.bfloat16() for t in distribution(dist, 1, layout.q_len, 2, 1, 64, seed=2))
    exact = reference_attention(q.float(), k.float(), v.float(), layout)
    kw = dict(block_m=64, block_n=128, fp8_pv=mode == "fp8")
    short_n = build_key_tiles(layout, 128, torch.device("cpu"), mode).short_n
    aligned = fp8_reference_attention(q, k, v, layout, aligned_tiles=True, short_n=short_n, **kw)
    _check_bound(aligned, exact, mode)
    assert errors(aligned, fp8_reference_attention(q, k, v, layout, **kw))[0] <= 5e-3  # measured <= 2.2e-3


def test_fake_quant_pair_walk_within_error_bound():
    """fp8 folding the full tiles two per softmax step (one running max per pair, as the Hopper kernel's
    ``tiles_per_step=2``) keeps the bound; P is rounded against another running max, nothing else changes."""
    layout = LAYOUTS["wide_frames"]
    q, k, v = (t.bfloat16() for t in distribution("normal", 1, layout.q_len, 2, 1, 64, seed=3))
    exact = reference_attention(q.float(), k.float(), v.float(), layout)
    kw = dict(block_m=64, block_n=128, aligned_tiles=True)
    pairs = fp8_reference_attention(q, k, v, layout, tiles_per_step=2, **kw)
    _check_bound(pairs, exact, "fp8")
    assert 0 < errors(pairs, fp8_reference_attention(q, k, v, layout, **kw))[0] <= 4e-2


def test_fake_quant_rounded_row_sums_within_error_bound():
    """fp8 normalising by the sum of the e4m3-rounded P (the Hopper kernel's ``rowsum_mma``) keeps the bound and
    moves the output by far less than the rounding of P itself."""
    layout = LAYOUTS["wide_frames"]
    q, k, v = (t.bfloat16() for t in distribution("peaked", 1, layout.q_len, 2, 1, 64, seed=4))
    exact = reference_attention(q.float(), k.float(), v.float(), layout)
    kw = dict(block_m=128, block_n=128, aligned_tiles=True, tiles_per_step=2)
    rounded = fp8_reference_attention(q, k, v, layout, rowsum_rounded=True, **kw)
    _check_bound(rounded, exact, "fp8")
    assert 0 < errors(rounded, fp8_reference_attention(q, k, v, layout, **kw))[0] <= 5e-3
    with pytest.raises(ValueError, match="rowsum_rounded: sums the e4m3-rounded P, so it needs fp8_pv=True"):
        fp8_reference_attention(q, k, v, layout, fp8_pv=False, rowsum_rounded=True)


def test_pair_steps_take_the_full_tiles_two_at_a_time():
    walk = [(0, 128), (256, 384), (512, 640), (130, 200), (700, 710)]
    assert _steps(walk, 128, 2) == [[(0, 128), (256, 384)], [(512, 640)], [(130, 200)], [(700, 710)]]
    assert _steps(walk[1:], 128, 2) == [[(256, 384), (512, 640)], [(130, 200)], [(700, 710)]]
    assert _steps(walk, 128, 1) == [[t] for t in walk]
    layout = LAYOUTS["empty_rows"]
    q, k, v = distribution("normal", 1, layout.q_len, 1, 1, 32, seed=0)
    with pytest.raises(ValueError, match="tiles_per_step: expected 1 or 2, got 3"):
        fp8_reference_attention(q, k, v, layout, tiles_per_step=3)


def _brute_force_walk(spans, block_n, aligned, short_n):
    """Group every key of every span by (span, block index); a group shorter than ``block_n`` is regrouped by
    ``short_n`` keys from its first (with ``short_n``); order the groups by (full or not, span, start)."""
    groups = {}
    for i, (s, e) in enumerate(spans):
        for key in range(s, e):
            groups.setdefault((i, key // block_n if aligned else (key - s) // block_n), []).append(key)
    pieces = []
    for (i, _), keys in groups.items():
        full = len(keys) == block_n
        step = block_n if full or not short_n else short_n
        pieces += [(not full, i, keys[j], keys[min(j + step, len(keys)) - 1] + 1) for j in range(0, len(keys), step)]
    return [(a, e) for _, _, a, e in sorted(pieces)]


@pytest.mark.parametrize("aligned,short_n", [(False, 0), (True, 0), (True, 64), (False, 32)])
def test_walk_matches_a_brute_force_enumeration(aligned, short_n):
    g = torch.Generator().manual_seed(17)
    for _ in range(40):
        cuts = torch.randint(0, 2000, (30,), generator=g).unique().tolist()
        spans = [(a, e) for a, e in zip(cuts[0::2], cuts[1::2])]  # ~15 disjoint spans in increasing order
        spans = [spans[i] for i in torch.randperm(len(spans), generator=g)]  # layout order need not be sorted
        walk = _walk([a for a, _ in spans], [e for _, e in spans], 128, aligned, short_n)
        assert walk == _brute_force_walk(spans, 128, aligned, short_n)
        assert sorted(key for a, e in walk for key in range(a, e)) == sorted(
            key for a, e in spans for key in range(a, e))
        sizes = [e - a for a, e in walk]
        ranks = [0 if n == 128 else 1 for n in sizes]
        assert ranks == sorted(ranks) and all(0 < n <= (128 if r == 0 else short_n or 128)
                                              for n, r in zip(sizes, ranks))
        if aligned:
            assert all(a // 128 == (e - 1) // 128 for a, e in walk)
    # the defaults are the portable kernel's walk: full tiles of every span, then every ragged tail
    assert _walk([0, 300], [200, 600], 128) == [(0, 128), (300, 428), (428, 556), (128, 200), (556, 600)]
    # aligned: cut at 128, 384, 512; full tiles, then the rest in tiles of <= 64 keys (span order, then position)
    assert _walk([0, 330], [200, 600], 128, True, 64) == [(0, 128), (384, 512), (128, 192), (192, 200),
                                                          (330, 384), (512, 576), (576, 600)]


def test_walk_arguments_are_checked():
    layout = LAYOUTS["empty_rows"]
    q, k, v = distribution("normal", 1, layout.q_len, 1, 1, 32, seed=0)
    with pytest.raises(ValueError, match="short_n: expected 0 <= short_n < block_n = 128, got 128"):
        fp8_reference_attention(q, k, v, layout, short_n=128)


def test_smoothing_is_what_keeps_biased_keys_accurate():
    """Without subtracting the key mean, a bias of 30 on 4 channels sets every block's INT8 scale, and the
    remaining channels lose their resolution: the error grows well past the bound."""
    layout = LAYOUTS["empty_rows"]
    q, k, v = (t.bfloat16() for t in distribution("kbias", 1, layout.q_len, 2, 1, 64, seed=1))
    exact = reference_attention(q.float(), k.float(), v.float(), layout)
    k8, ks = quantize_keys(k.float())  # per 128-token block, unsmoothed
    q8, qs = quantize_int8(q.float())
    k_blocks = ks.repeat_interleave(KEY_QUANT_BLOCK, dim=2)[:, :, :k.shape[1]].transpose(1, 2)[..., None]
    unsmoothed = reference_attention(q8 * qs, k8 * k_blocks, v.float(), layout)
    smoothed = fp8_reference_attention(q, k, v, layout, block_m=128, block_n=64, fp8_pv=False)
    assert errors(unsmoothed, exact)[0] > 3 * errors(smoothed, exact)[0]


def test_fake_quant_lse_is_unsmoothed():
    layout = LAYOUTS["text"]
    q, k, v = (t.bfloat16() for t in distribution("kbias", 1, layout.q_len, 2, 2, 64, seed=4))
    _, lse = fp8_reference_attention(q, k, v, layout, return_lse=True)
    _, exact = reference_attention(q.float(), k.float(), v.float(), layout, return_lse=True)
    assert torch.allclose(lse, exact, atol=0.05)


# ----------------------------------------------------------------------------------- kernel (interpreter / GPU)
needs_kernel = pytest.mark.skipif(CUDA and not FP8_GPU, reason="8-bit kernel needs CUDA sm_89+ on a CUDA machine")
KERNEL_DTYPES = [torch.bfloat16, torch.float16] if CUDA else [torch.float16]  # bf16 tl.dot is wrong on the CPU


def _kernel_case(layout, dist, B, H, Hkv, D, dtype, seed, mode, strided=False):
    q, k, v = (t.to(DEVICE, dtype) for t in distribution(dist, B, layout.q_len, H, Hkv, D, seed))
    if strided:  # views with padded heads and a padded sequence stride
        q = torch.cat([q, q], dim=2)[:, :, :H]
        k, v = (torch.cat([t, t], dim=2)[:, :, :Hkv] for t in (k, v))
    out, lse = block_sparse_attn(q, k, v, layout, backend="triton", precision=mode, return_lse=True)
    from lvsa_kernels.backends.triton_backend import config_for

    cfg = config_for(q, k, v, layout, D ** -0.5, mode)
    ref, ref_lse = fp8_reference_attention(q, k, v, layout, block_m=cfg.block_m, block_n=cfg.block_n,
                                           fp8_pv=mode == "fp8", return_lse=True)
    exact = reference_attention(q.float(), k.float(), v.float(), layout)
    assert out.dtype == dtype and out.shape == q.shape and torch.isfinite(out).all()
    tight = 1e-4 if DEVICE == "cpu" else 3e-3  # fp16 output roundings flip on float32 summation order
    assert errors(out, ref)[0] <= tight, errors(out, ref)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert torch.allclose(lse[finite], ref_lse[finite], atol=1e-4 if DEVICE == "cpu" else 2e-3)
    _check_bound(out, exact, mode)
    empty = ~finite.all(dim=(0, 1))
    assert torch.equal(out[:, empty], torch.zeros_like(out[:, empty]))
    return out


@needs_kernel
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("mode", ["fp8", "int8_qk"])
def test_kernel_matches_fake_quant_text_gqa_batch2(mode, dtype):
    # 140 tokens: two K scale blocks per head (empty_rows has key tiles that straddle token 128)
    small_text = LVSAPattern(window=2, n_first=1, reference_frames=8).plan(8, 16, step=1, text_tokens=12)
    _kernel_case(small_text, "kbias", B=2, H=2, Hkv=1, D=32, dtype=dtype, seed=5, mode=mode)


@needs_kernel
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_kernel_matches_fake_quant_ragged_empty_rows_strided(dtype):
    _kernel_case(LAYOUTS["empty_rows"], "peaked", B=1, H=2, Hkv=1, D=32, dtype=dtype, seed=6, mode="fp8",
                 strided=True)


@needs_kernel
def test_kernel_writes_every_output_element():
    from lvsa_kernels.backends.triton_backend import config_for
    from lvsa_kernels.triton_src.launch import run_scheduled
    from lvsa_kernels.triton_src.schedule import build_schedule

    layout = LAYOUTS["empty_rows"]
    dtype = KERNEL_DTYPES[0]
    q, k, v = (t.to(DEVICE, dtype) for t in distribution("normal", 1, layout.q_len, 1, 1, 32, seed=7))
    cfg = config_for(q, k, v, layout, 0.125, "fp8")
    out = torch.full_like(q, float("nan"))
    run_scheduled(q, k, v, build_schedule(layout, cfg.block_m, q.device), False, 0.125, cfg, out=out,
                  precision="fp8")
    ref = fp8_reference_attention(q, k, v, layout, scale=0.125, block_m=cfg.block_m, block_n=cfg.block_n)
    assert torch.isfinite(out).all()
    assert errors(out, ref)[0] <= (1e-5 if DEVICE == "cpu" else 3e-3)


@needs_kernel
def test_quantize_kv_matches_the_reference_bit_for_bit():
    from lvsa_kernels.triton_src.fp8_quant import quantize_kv

    k, v = (t.to(DEVICE, torch.float16) for t in distribution("kbias", 2, 300, 2, 2, 32, seed=8)[1:])
    k[:, 140:150, 0] *= 40  # a block whose amax is set by a few tokens
    k[1, :, 1] = 0  # a head of zeros: every block's scale is 1
    v[:, :, 0, 3] *= 1e-4  # a channel of tiny values: e4m3 subnormals
    got = quantize_kv(k, v, fp8_pv=True, interpreted=not CUDA)
    k8, ks = quantize_keys(k.float() - key_mean(k)[:, None])
    v_scale, v_inv = value_channel_scale(v)
    v8 = (v.float() * v_inv[:, None]).to(torch.float8_e4m3fn)
    assert got.k_scale.shape == (2, 2, 3) and got.k_scale.is_contiguous()  # blocks of 128, 128, 44 tokens
    assert torch.equal(got.k8.float(), k8) and torch.equal(got.k_scale, ks)
    assert (ks[1, 1] == 1).all() and (ks[:, 0, 1] > 10 * ks[:, 0, 0]).all()
    assert got.vt8.shape == (2, 2, 32, 304)  # tokens padded to 16
    assert torch.equal(got.vt8[..., :300].view(torch.uint8), v8.permute(0, 2, 3, 1).view(torch.uint8))
    assert not got.vt8[..., 300:].view(torch.uint8).any()  # the padding columns are +0
    assert torch.equal(got.v_scale, v_scale)


@needs_kernel
@pytest.mark.parametrize("block_s", [16, 64])
def test_hopper_fp8_values_are_stored_in_wgmma_key_order(block_s):
    """The Hopper kernel's V^T: within each aligned group of 32 tokens, token 16h + 8i + 2q + e at column
    16h + 4q + 2i + e (a bijection per group), padding columns to a whole group +0 (also where the programs of
    ``block_s`` tokens cover the tokens before the padding)."""
    from lvsa_kernels.triton_src.fp8_quant import quantize_kv

    k, v = (t.to(DEVICE, torch.float16) for t in distribution("normal", 2, 300, 2, 2, 32, seed=8)[1:])
    natural = quantize_kv(k, v, fp8_pv=True, interpreted=not CUDA).vt8
    got = quantize_kv(k, v, fp8_pv=True, interpreted=not CUDA, block_s=block_s, wgmma_order=True).vt8
    assert got.shape == (2, 2, 32, 320) and got.is_contiguous()
    token = torch.arange(320)
    h, i, q, e = token % 32 // 16, token % 16 // 8, token % 8 // 2, token % 2
    column = token // 32 * 32 + 16 * h + 4 * q + 2 * i + e
    assert torch.equal(column.sort().values, token)
    expected = torch.zeros_like(got.view(torch.uint8))
    expected[..., column[:300].to(DEVICE)] = natural[..., :300].view(torch.uint8)
    assert torch.equal(got.view(torch.uint8), expected)


@needs_kernel
@pytest.mark.parametrize("per_head,block_m", [(False, 64), (True, 64), (False, 96)])
def test_quantize_q_tiles_matches_the_reference_bit_for_bit(per_head, block_m):
    """The Hopper kernel's Q pre-pass: per schedule tile, the reference's INT8 values and scale, and q . k_mean;
    also for tiles whose height is not a power of two (the 192-row tiles of three consumers, here 96)."""
    from lvsa_kernels.triton_src.fp8_quant import quantize_q_tiles
    from lvsa_kernels.triton_src.schedule import build_schedule

    layout = LAYOUTS["empty_rows"]
    if per_head:  # two heads with different blocks (and so different tiles)
        mask = torch.rand(2, 4, 3, generator=torch.Generator().manual_seed(3)) < 0.6
        layout = BlockSparseLayout.from_block_mask(mask, [[100, 20, 0, 144], [60, 60, 100, 44]], [90, 90, 84])
    q, k, _ = (t.to(DEVICE, torch.float16) for t in distribution("peaked", 2, layout.q_len, 2, 1, 32, seed=9))
    q = torch.cat([q, q], dim=2)[:, :, :2]  # strided heads
    mean = key_mean(k)
    sched = build_schedule(layout, block_m, q.device)
    got = quantize_q_tiles(q, mean, sched.tensors()[:3], sched.max_tiles, per_head, block_m, interpreted=not CUDA)
    tile_ptr, starts, ends = (t.tolist() for t in sched.tensors()[:3])
    for b in range(2):
        for h in range(2):
            lh = h if per_head else 0
            for i, t in enumerate(range(tile_ptr[lh], tile_ptr[lh + 1])):
                rows = q[b, starts[t]:ends[t], h].float()
                q8, scale = quantize_int8(rows.reshape(-1))
                assert torch.equal(got.q8[b, starts[t]:ends[t], h].float(), q8.view_as(rows))
                assert got.q_scale[b * 2 + h, i] == scale
                assert torch.allclose(got.q_mu[b, h, starts[t]:ends[t]], rows @ mean[b, 0], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- Hopper kernel (sm_90 GPU)
def _hopper_8bit_configs(unmeasured=True):
    from lvsa_kernels.triton_src.tuning import hopper_configs

    return [(mode, cfg) for mode in ("fp8", "int8_qk") for cfg in hopper_configs(128, mode, unmeasured=unmeasured)]


def _hopper_ready():
    from lvsa_kernels.triton_src.launch import hopper_kernel_available

    return CUDA and torch.cuda.get_device_capability() == (9, 0) and hopper_kernel_available()


needs_hopper = pytest.mark.skipif(not _hopper_ready(), reason="the Gluon kernel runs on sm_90 GPUs (verified Triton)")


def _walk_of(cfg, layout, precision):
    """The fake-quant reference's tile arguments for the kernel ``cfg`` runs: the Hopper kernel's 8-bit walk keeps
    each key tile inside one aligned 128-token block (one K scale per tile), takes its short tiles last,
    (``tiles_per_step=2``) folds its full tiles in pairs and (``rowsum_mma``) sums the rounded P."""
    from lvsa_kernels.triton_src.schedule import build_key_tiles

    if cfg.kernel == "hopper":
        tiles = build_key_tiles(layout, cfg.block_n, torch.device("cpu"), precision)
        return dict(block_n=cfg.block_n, aligned_tiles=True, short_n=tiles.short_n, tiles_per_step=cfg.tiles_per_step,
                    rowsum_rounded=cfg.rowsum_mma)
    return dict(block_n=cfg.block_n)


HOPPER_CASES = [("text", "kbias", False), ("empty_rows", "peaked", True), ("long_rows", "normal", False),
                ("wide_frames", "peaked", True), ("aligned_blocks", "normal", False)]


# every config in bf16; fp16 (the same products in another element type) for the tuner's configs only
HOPPER_8BIT_RUNS = ([(mode, cfg, torch.bfloat16) for mode, cfg in _hopper_8bit_configs()]
                    + [(mode, cfg, torch.float16) for mode, cfg in _hopper_8bit_configs(unmeasured=False)])


@needs_hopper
@pytest.mark.parametrize("mode,cfg,dtype", HOPPER_8BIT_RUNS, ids=lambda x: str(x).replace(" ", "_"))
@pytest.mark.parametrize("layout_name,dist,strided", HOPPER_CASES, ids=[c[0] for c in HOPPER_CASES])
def test_hopper_kernel_matches_fake_quant(layout_name, dist, strided, mode, cfg, dtype):
    """The 8-bit Hopper kernel (poisoned output buffer, GQA, batch 2) against the fake-quant reference with its
    query tiles (128 rows, or 192 with three consumers) and aligned key walk (tight), and against float32
    attention (the accuracy bound); rows without keys: 0, -inf."""
    _check_hopper_8bit(LAYOUTS[layout_name], dist, strided, mode, cfg, dtype, 128)


@needs_hopper
@pytest.mark.parametrize("cfg", [c for c in _hopper_8bit_configs() if c not in _hopper_8bit_configs(False)],
                         ids=lambda x: str(x).replace(" ", "_"))
@pytest.mark.parametrize("layout_name", ["wide_frames", "aligned_blocks"])
def test_hopper_unmeasured_fp8_variants_at_head_dim_64(layout_name, cfg):
    """The variants waiting for their first GPU measurement (two key tiles per step, 192-row tiles, row sums on
    the tensor cores) at head dim 64 too, on the layouts where the pair walk runs."""
    _check_hopper_8bit(LAYOUTS[layout_name], "normal", False, cfg[0], cfg[1], torch.bfloat16, 64)


def _check_hopper_8bit(layout, dist, strided, mode, cfg, dtype, head_dim):
    from lvsa_kernels.triton_src.launch import hopper_refusal, run_scheduled
    from lvsa_kernels.triton_src.schedule import build_key_tiles, build_schedule

    # key spans start anywhere (fp8 loads the aligned block holding each tile)
    q, k, v = (t.to("cuda", dtype) for t in distribution(dist, 2, max(layout.q_len, layout.kv_len), 4, 2, head_dim,
                                                          seed=11))
    q, k, v = q[:, :layout.q_len], k[:, :layout.kv_len], v[:, :layout.kv_len]
    if strided:
        q = torch.cat([q, q], dim=2)[:, :, :4]
        k, v = (torch.cat([t, t], dim=2)[:, :, :2] for t in (k, v))
    assert hopper_refusal(q, k, v) is None
    out = torch.full_like(q, float("nan"))
    out, lse = run_scheduled(q, k, v, build_schedule(layout, cfg.block_m, q.device), False, 0.09, cfg, out=out,
                             precision=mode, key_tiles=build_key_tiles(layout, cfg.block_n, q.device, mode))
    walk = _walk_of(cfg, layout, mode)
    ref, ref_lse = fp8_reference_attention(q, k, v, layout, scale=0.09, block_m=cfg.block_m, fp8_pv=mode == "fp8",
                                           return_lse=True, **walk)
    assert torch.isfinite(out).all()
    assert errors(out, ref)[0] <= 3e-3, errors(out, ref)
    if cfg.tiles_per_step == 2:  # closer to the pairs it makes than to one tile per step, where they differ
        single = fp8_reference_attention(q, k, v, layout, scale=0.09, block_m=cfg.block_m,
                                         **dict(walk, tiles_per_step=1))
        if not torch.equal(single, ref):
            assert errors(out, ref)[0] < 0.5 * errors(out, single)[0], (errors(out, ref), errors(out, single))
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert torch.allclose(lse[finite], ref_lse[finite], atol=2e-3), (lse[finite] - ref_lse[finite]).abs().max()
    _check_bound(out, reference_attention(q.float(), k.float(), v.float(), layout, scale=0.09), mode)
    empty = ~finite.all(dim=(0, 1))
    assert torch.equal(out[:, empty], torch.zeros_like(out[:, empty]))


@needs_hopper
def test_hopper_int8_rows_of_short_tiles_only():
    """``int8_qk`` on rows whose every key tile is short (the short walk starts the consumers' turns)."""
    from lvsa_kernels.triton_src.launch import run_scheduled
    from lvsa_kernels.triton_src.schedule import build_key_tiles, build_schedule
    from lvsa_kernels.triton_src.tuning import hopper_configs

    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, ::2] = mask[1, 1::2] = mask[2] = True
    layout = BlockSparseLayout.from_block_mask(mask, [100, 128, 70], [24, 30, 20, 28, 26, 22, 29, 25])
    q, k, v = (t.to("cuda", torch.bfloat16) for t in distribution("normal", 2, layout.q_len, 4, 2, 128, seed=17))
    k, v = k[:, :layout.kv_len], v[:, :layout.kv_len]
    cfg = hopper_configs(128, "int8_qk")[0]
    tiles = build_key_tiles(layout, 128, q.device, "int8_qk")
    assert tiles.short_n == 32 and tiles.row_masked.tolist() == [4, 4, 3]
    out, _ = run_scheduled(q, k, v, build_schedule(layout, 128, q.device), False, 0.09, cfg,
                           out=torch.full_like(q, float("nan")), precision="int8_qk", key_tiles=tiles)
    ref = fp8_reference_attention(q, k, v, layout, scale=0.09, fp8_pv=False, **_walk_of(cfg, layout, "int8_qk"))
    assert errors(out, ref)[0] <= 3e-3


@needs_hopper
@pytest.mark.parametrize("mode", ["fp8", "int8_qk"])
def test_block_sparse_attn_runs_the_8bit_hopper_kernel(mode, monkeypatch, isolated_dispatch_cache):
    from lvsa_kernels.backends.triton_backend import AUTOTUNE_ENV, config_for

    monkeypatch.setenv(AUTOTUNE_ENV, "0")  # the first candidate: the Hopper kernel where it may run
    for frame, text in ((320, 48), (300, 40)):  # key spans 16-aligned or not: the Hopper kernel runs both
        layout = LVSAPattern(window=2, n_first=1, reference_frames=8).plan(9, frame, step=1, text_tokens=text)
        q, k, v = (t.to("cuda", torch.bfloat16) for t in distribution("kbias", 1, layout.q_len, 2, 2, 128, seed=12))
        out = block_sparse_attn(q, k, v, layout, backend="triton", precision=mode)
        cfg = config_for(q, k, v, layout, 128 ** -0.5, mode)
        assert cfg.kernel == "hopper", (frame, cfg)
        ref = fp8_reference_attention(q, k, v, layout, block_m=cfg.block_m, fp8_pv=mode == "fp8",
                                      **_walk_of(cfg, layout, mode))
        assert errors(out, ref)[0] <= 3e-3
        _check_bound(out, reference_attention(q.float(), k.float(), v.float(), layout), mode)


def test_launch_guards_the_8bit_paths_that_fault():
    """The portable fp8 mode never reads V^T through TMA; an unknown precision is refused by both launchers;
    a cached config that the inputs cannot run is tuned again rather than used."""
    from lvsa_kernels.backends.triton_backend import _config_can_run
    from lvsa_kernels.triton_src.launch import launch, launch_hopper
    from lvsa_kernels.triton_src.tuning import KernelConfig, hopper_configs

    q = torch.zeros(1, 16, 1, 32, dtype=torch.float16)
    args = (q, q, q, q.clone(), torch.zeros(1, 1, 16), (), 1, False, 0.1)
    with pytest.raises(ValueError, match="use_tma must be False"):
        launch(*args, KernelConfig(16, 16, 1, 1, use_tma=True), precision="fp8")
    for launcher, extra in ((launch, ()), (launch_hopper, ((), 0))):
        with pytest.raises(ValueError, match="'fp16'"):
            launcher(*args[:6], *extra, *args[6:], KernelConfig(128, 128, 4, 2, True, True, "hopper"), "fp16")
    tma = KernelConfig(128, 128, 8, 3, use_tma=True)
    assert _config_can_run(tma, False, True, "int8_qk") and not _config_can_run(tma, False, True, "fp8")
    assert not _config_can_run(tma, False, False, "exact")
    assert not _config_can_run(hopper_configs(128)[0], False, True, "exact")
    assert _config_can_run(hopper_configs(128)[0], True, True, "fp8")
    pairs = KernelConfig(128, 128, 4, 4, True, True, "hopper", 0, 2)
    three_consumers = KernelConfig(192, 128, 4, 2, True, True, "hopper")
    row_sums = KernelConfig(128, 128, 4, 2, True, True, "hopper", 0, 1, True)
    for fp8_only in (pairs, three_consumers, row_sums):  # a cache entry for another precision is tuned again
        assert _config_can_run(fp8_only, True, True, "fp8")
        assert not any(_config_can_run(fp8_only, True, True, p) for p in ("exact", "int8_qk"))


# ----------------------------------------------------------------------------------- precision checks
def test_unknown_precision_names_the_value():
    layout = LAYOUTS["empty_rows"]
    q, k, v = distribution("normal", 1, layout.q_len, 1, 1, 32, seed=0)
    with pytest.raises(ValueError, match="precision: expected one of .*'fp4'"):
        block_sparse_attn(q, k, v, layout, precision="fp4")


def test_backends_without_8bit_raise_and_auto_keeps_the_precision(isolated_dispatch_cache):
    from lvsa_kernels import BlockSparseLayout

    dense = BlockSparseLayout.dense(64)
    q, k, v = (t.to(DEVICE, torch.float16) for t in distribution("normal", 1, 64, 1, 1, 32, seed=0))
    for name in ("reference", "sdpa"):
        with pytest.raises(BackendUnavailable, match="precision"):
            block_sparse_attn(q, k, v, dense, backend=name, precision="fp8")
    # a dense layout would go to SDPA; with fp8 only the 8-bit backend is considered
    assert dispatch.select_backend("auto", q, k, v, dense, 0.2, False, "fp8").name == "triton"
    with pytest.raises(BackendUnavailable, match="float16/bfloat16"):
        block_sparse_attn(q.float(), k.float(), v.float(), dense, backend="triton", precision="fp8")


@pytest.mark.skipif(CUDA, reason="CPU behaviour")
def test_cpu_without_the_interpreter_raises(isolated_dispatch_cache, monkeypatch):
    from lvsa_kernels.triton_src import tuning

    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    layout = LAYOUTS["empty_rows"]
    q, k, v = (t.half() for t in distribution("normal", 1, layout.q_len, 1, 1, 32, seed=0))
    with pytest.raises(BackendUnavailable, match="precision='fp8'"):
        block_sparse_attn(q, k, v, layout, precision="fp8")


def test_gpus_before_sm89_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")

    class FakeCudaTensor:
        device, dtype, shape = torch.device("cuda", 0), torch.bfloat16, (1, 8, 1, 64)

    reason = get_backend("triton").precision_reason("fp8", FakeCudaTensor())
    assert "sm_89" in reason and "A100" in reason and "sm_80" in reason
    assert get_backend("triton").precision_reason("exact", FakeCudaTensor()) is None


# ----------------------------------------------------------------------------------- diffusers shim
def test_enable_lvsa_and_enable_svoo_pass_the_precision(monkeypatch):
    pytest.importorskip("diffusers")
    from tiny_wan import inputs, run, tiny_transformer

    from lvsa_kernels.diffusers import disable_lvsa, enable_lvsa, enable_svoo
    from lvsa_kernels.diffusers import runtime
    from lvsa_kernels import SVOOPattern

    seen = []

    def recording(q, k, v, layout, backend="auto", precision="exact", **kw):
        seen.append(precision)
        return reference_attention(q, k, v, layout)

    monkeypatch.setattr(runtime, "block_sparse_attn", recording)
    monkeypatch.setattr(runtime, "select_backend", lambda *args: get_backend("reference"))  # head dim 12: log only
    monkeypatch.setattr(SVOOPattern, "attention", lambda self, q, k, v, **kw: seen.append(kw["precision"]) or q)
    transformer = tiny_transformer(0)
    with pytest.raises(ValueError, match="precision"):
        enable_lvsa(transformer, precision="int4")
    for enable in (lambda t: enable_lvsa(t, precision="fp8"), lambda t: enable_svoo(t, precision="int8_qk")):
        handle = enable(transformer)
        run(transformer, inputs(batch=1), 900.0)
        disable_lvsa(transformer)
        assert handle.runtime.precision in seen and len(set(seen)) == 1
        seen.clear()


def test_run_scheduled_refuses_an_exp2_split_it_cannot_run():
    """``exp2_poly`` is 0 or 4, and only the Hopper kernel has the split."""
    from lvsa_kernels.triton_src.launch import run_scheduled
    from lvsa_kernels.triton_src.schedule import build_schedule
    from lvsa_kernels.triton_src.tuning import INTERPRETER_CONFIG, KernelConfig

    layout = LAYOUTS["text"]
    q = torch.zeros(1, layout.q_len, 1, 32, dtype=torch.float16)
    sched = build_schedule(layout, INTERPRETER_CONFIG.block_m, q.device)
    portable = KernelConfig(16, 16, 1, 1, exp2_poly=4)
    with pytest.raises(ValueError, match="cfg.exp2_poly: expected 0 or 4"):
        run_scheduled(q, q[:, :layout.kv_len], q[:, :layout.kv_len], sched, False, 0.1, portable)
    with pytest.raises(ValueError, match="got 2"):
        run_scheduled(q, q, q, sched, False, 0.1, KernelConfig(128, 128, 4, 2, True, True, "hopper", 2))


@pytest.mark.parametrize("precision", ["exact", "int8_qk", "fp8"])
def test_run_scheduled_refuses_fp8_variants_elsewhere(precision):
    """``tiles_per_step=2`` and ``rowsum_mma`` exist in the Hopper kernel's fp8 mode only (P in e4m3 leaves
    registers for two score tiles; the row sums multiply e4m3 P), ``rowsum_mma`` with 128-row tiles only."""
    from lvsa_kernels.triton_src.launch import run_scheduled
    from lvsa_kernels.triton_src.schedule import build_key_tiles, build_schedule
    from lvsa_kernels.triton_src.tuning import KernelConfig

    layout = LAYOUTS["text"]
    q = torch.zeros(1, layout.q_len, 1, 32, dtype=torch.float16)
    sched = build_schedule(layout, 16, q.device)
    with pytest.raises(ValueError, match="cfg.tiles_per_step: expected 1, got 2"):
        run_scheduled(q, q, q, sched, False, 0.1, KernelConfig(16, 16, 1, 1, tiles_per_step=2), precision=precision)
    rowsum = "cfg.rowsum_mma: the row sums on the tensor cores exist in the hopper kernel's fp8 mode"
    with pytest.raises(ValueError, match=rowsum):
        run_scheduled(q, q, q, sched, False, 0.1, KernelConfig(16, 16, 1, 1, rowsum_mma=True), precision=precision)
    if precision != "fp8":
        with pytest.raises(ValueError, match=rowsum):
            run_scheduled(q, q, q, sched, False, 0.1, KernelConfig(128, 128, 4, 2, True, True, "hopper", 0, 1, True),
                          precision=precision)
    else:  # a pair holds two ring slots; 192-row tiles walk one tile per step and sum on the FMA units
        with pytest.raises(ValueError, match=rowsum):
            run_scheduled(q, q, q, build_schedule(layout, 192, q.device), False, 0.1,
                          KernelConfig(192, 128, 4, 2, True, True, "hopper", 0, 1, True), precision=precision,
                          key_tiles=build_key_tiles(layout, 128, q.device, precision))
        with pytest.raises(ValueError, match="at least 2 stages"):
            run_scheduled(q, q, q, build_schedule(layout, 128, q.device), False, 0.1,
                          KernelConfig(128, 128, 4, 1, True, True, "hopper", 0, 2), precision=precision,
                          key_tiles=build_key_tiles(layout, 128, q.device, precision))
        with pytest.raises(ValueError, match="192-row query tiles fold one key tile per step"):
            run_scheduled(q, q, q, build_schedule(layout, 192, q.device), False, 0.1,
                          KernelConfig(192, 128, 4, 4, True, True, "hopper", 0, 2), precision=precision,
                          key_tiles=build_key_tiles(layout, 128, q.device, precision))
    if precision != "fp8":
        with pytest.raises(ValueError, match="cfg.tiles_per_step: expected 1, got 2"):
            run_scheduled(q, q, q, sched, False, 0.1, KernelConfig(128, 128, 4, 4, True, True, "hopper", 0, 2),
                          precision=precision)
