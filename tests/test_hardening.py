"""Unusual and bad inputs: any finite scale, argument types, degenerate shapes, threads (issue 11)."""
import threading

import pytest
import torch

from lvsa_kernels import BlockSparseLayout, LVSAPattern, block_sparse_attn
from lvsa_kernels.api import SCALE_CAP, effective_scale
from lvsa_kernels.reference.args import ArgumentError
from random_inputs import random_qkv

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SPARSE_BACKENDS = ["reference", "triton"]


def float64_attention(q, k, v, layout, scale):
    """Masked softmax in float64 from the token mask; keyless rows give 0 and lse -inf."""
    mask = layout.to_token_mask()                                   # [Hl, Sq, Skv]
    H = q.shape[2]
    rep = H // k.shape[2]
    qd = q.double().permute(0, 2, 1, 3)
    kd = k.double().repeat_interleave(rep, dim=2).permute(0, 2, 3, 1)
    vd = v.double().repeat_interleave(rep, dim=2).permute(0, 2, 1, 3)
    s = (qd @ kd) * scale
    s = s.masked_fill(~mask.expand(H, -1, -1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.clamp(min=-1e300)[..., None]).nan_to_num(0.0)
    return (p @ vd).permute(0, 2, 1, 3), lse


def ragged_layout():
    """Key spans of 9 and 6 tokens: never a multiple of the kernel's tile width (ragged tails)."""
    return BlockSparseLayout.from_block_mask(torch.tensor([[True, False], [True, True]]), [5, 7], [9, 6])


def inputs(seed=0, dtype=torch.float32):
    return tuple(t.to(DEVICE) for t in random_qkv(1, 12, 15, 2, 2, 16, seed, dtype))


@pytest.mark.parametrize("backend", SPARSE_BACKENDS + ["sdpa"])
@pytest.mark.parametrize("scale", [0.0, -0.25, -3.0, 1e-30, 7.5])
def test_any_finite_scale_matches_float64(backend, scale):
    q, k, v = inputs()
    layout = ragged_layout() if backend != "sdpa" else BlockSparseLayout.dense(12, 15)
    return_lse = backend != "sdpa"  # sdpa returns no lse
    result = block_sparse_attn(q, k, v, layout, backend=backend, scale=scale, return_lse=return_lse)
    out, lse = result if return_lse else (result, None)
    ref, ref_lse = float64_attention(q.cpu(), k.cpu(), v.cpu(), layout, scale)
    assert torch.allclose(out.cpu().double(), ref, atol=2e-5), (out.cpu().double() - ref).abs().max()
    assert lse is None or torch.allclose(lse.cpu().double(), ref_lse, atol=2e-5)


@pytest.mark.parametrize("backend", SPARSE_BACKENDS + ["sdpa"])
@pytest.mark.parametrize("scale", [1e36, -1e36, 1e300])
def test_huge_scale_is_a_hard_max_without_overflow(backend, scale):
    """float64 softmax at a huge scale is a hard max over each row's allowed keys (no NaN, no inf)."""
    q, k, v = inputs(1)
    layout = ragged_layout() if backend != "sdpa" else BlockSparseLayout.dense(12, 15)
    out = block_sparse_attn(q, k, v, layout, backend=backend, scale=scale)
    mask = layout.to_token_mask()[0]
    s = torch.einsum("bqhd,bkhd->bhqk", q.cpu().double(), k.cpu().double()) * (1 if scale > 0 else -1)
    s = s.masked_fill(~mask, float("-inf"))
    hard = torch.einsum("bhqk,bkhd->bqhd", torch.nn.functional.one_hot(s.argmax(-1), 15).double(), v.cpu().double())
    assert torch.isfinite(out).all()
    assert torch.allclose(out.cpu().double(), hard, atol=1e-5)


def test_huge_scale_lse_is_scaled_back():
    q, k, v = inputs(2, torch.float64)
    layout = ragged_layout()
    _, lse = block_sparse_attn(q, k, v, layout, backend="reference", scale=1e35, return_lse=True)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k).masked_fill(~layout.to_token_mask()[0].to(q.device), float("-inf"))
    assert torch.allclose(lse.double(), s.amax(-1) * 1e35, rtol=1e-6)  # no ties: lse = scale * max score


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_lse_beyond_float32_is_rejected(backend):
    """At scale 1e39 the lse of a row with keys (scale times its largest score) exceeds float32: ValueError
    naming scale, never an inf lse; without lse the output is the hard maximum."""
    q, k, v = inputs(3)
    with pytest.raises(ValueError, match="scale: at 1e.39 the lse .* exceeds float32"):
        block_sparse_attn(q, k, v, ragged_layout(), backend=backend, scale=1e39, return_lse=True)
    assert torch.isfinite(block_sparse_attn(q, k, v, ragged_layout(), backend=backend, scale=1e39)).all()


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_scale_beyond_float32_on_tiny_scores_is_rejected(backend):
    """Scores 1e39 * 1e-36 are ordinary (no hard maximum) but the scale has no float32 value."""
    q, k, v = inputs(4)
    with pytest.raises(ValueError, match="scale: 1e.39 exceeds float32's range"):
        block_sparse_attn(q * 1e-18, k * 1e-18, v, ragged_layout(), backend=backend, scale=1e39)


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_huge_scale_on_zero_scores_is_uniform(backend):
    """q = 0: every score is 0 at any scale; out is the mean of the row's values and lse log(keys)."""
    q, k, v = inputs(5)
    layout = ragged_layout()
    out, lse = block_sparse_attn(torch.zeros_like(q), k, v, layout, backend=backend, scale=1e39, return_lse=True)
    ref, ref_lse = float64_attention(torch.zeros_like(q).cpu(), k.cpu(), v.cpu(), layout, 1.0)
    assert torch.allclose(out.cpu().double(), ref, atol=1e-5) and torch.allclose(lse.cpu().double(), ref_lse)


def test_effective_scale_leaves_ordinary_scales_alone():
    q, k, _ = inputs()
    assert effective_scale(q, k, 0.125) == (0.125, 1.0)
    assert effective_scale(q, k, -40.0) == (-40.0, 1.0)
    capped, factor = effective_scale(q, k, -1e35)
    assert capped < 0 and factor > 1 and abs(capped) * float(q.norm(dim=-1).max() * k.norm(dim=-1).max()) <= \
        SCALE_CAP * 1.001


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), "0.5", object(), True, [1.0]])
def test_bad_scale_is_a_value_error_naming_scale(scale):
    q, k, v = inputs()
    with pytest.raises(ValueError, match="scale"):
        block_sparse_attn(q, k, v, ragged_layout(), backend="reference", scale=scale)


@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_return_lse_must_be_a_bool(value):
    q, k, v = inputs()
    with pytest.raises(TypeError, match="return_lse"):
        block_sparse_attn(q, k, v, ragged_layout(), backend="reference", return_lse=value)


@pytest.mark.parametrize("backend", SPARSE_BACKENDS + ["auto"])
@pytest.mark.parametrize("case", ["batch0", "sq0", "skv0", "heads0", "empty_mask"])
def test_no_work_gives_zeros_and_minus_inf_on_every_backend(backend, case, isolated_dispatch_cache):
    q, k, v = inputs()
    layout = ragged_layout()
    if case == "batch0":
        q, k, v = q[:0], k[:0], v[:0]
    elif case == "sq0":
        q = q[:, :0]
        layout = BlockSparseLayout.from_block_mask(torch.ones(1, 1, dtype=torch.bool), [0], [15])
    elif case == "skv0":
        k, v = k[:, :0], v[:, :0]
        layout = BlockSparseLayout.from_block_mask(torch.ones(1, 1, dtype=torch.bool), [12], [0])
    elif case == "heads0":
        q = q[:, :, :0]
    else:
        layout = BlockSparseLayout.from_block_mask(torch.zeros(2, 2, dtype=torch.bool), [5, 7], [9, 6])
    out, lse = block_sparse_attn(q, k, v, layout, backend=backend, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype and not out.any()
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and (lse == float("-inf")).all()


def test_head_dim_zero_is_one_clear_error():
    q, k, v = (t[..., :0] for t in inputs())
    for backend in SPARSE_BACKENDS + ["auto"]:
        with pytest.raises(ValueError, match="head dim must be >= 1"):
            block_sparse_attn(q, k, v, ragged_layout(), backend=backend)


@pytest.mark.parametrize("kwargs, name", [
    (dict(window=2.0), "window"), (dict(window=True), "window"), (dict(n_first=-1), "n_first"),
    (dict(reference_frames=False), "reference_frames"), (dict(sparsity_scale=True), "sparsity_scale"),
    (dict(sparsity_scale=float("nan")), "sparsity_scale"), (dict(key_frame_interval=2.5), "key_frame_interval"),
    (dict(expand_window=1), "expand_window"), (dict(rotate="no"), "rotate"),
])
def test_lvsa_pattern_knobs_are_typed(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LVSAPattern(**kwargs)


@pytest.mark.parametrize("kwargs, name", [
    (dict(frames=4.0), "frames"), (dict(tokens_per_frame=2.5), "tokens_per_frame"),
    (dict(tokens_per_frame=True), "tokens_per_frame"), (dict(text_tokens=1.0), "text_tokens"),
    (dict(text_tokens=-2), "text_tokens"), (dict(step=1.0), "step"), (dict(step=True), "step"),
])
def test_lvsa_plan_integers_are_integers(kwargs, name):
    args = dict(frames=4, tokens_per_frame=3) | kwargs
    with pytest.raises(ValueError, match=name) as err:
        LVSAPattern().plan(**args)
    assert repr(kwargs[name]) in str(err.value) or str(kwargs[name]) in str(err.value)


def test_numpy_integers_are_integers():
    np = pytest.importorskip("numpy")
    layout = LVSAPattern(window=np.int64(1)).plan(np.int32(5), np.int64(2), step=np.int16(1))
    assert layout.q_len == 10


def test_argument_error_is_both_type_and_value_error():
    assert issubclass(ArgumentError, TypeError) and issubclass(ArgumentError, ValueError)


def test_concurrent_calls_from_threads():
    """Several threads at once (Triton's interpreter has process-wide state: its calls are serialised)."""
    q, k, v = inputs(3)
    layout = ragged_layout()
    want = block_sparse_attn(q, k, v, layout, backend="triton")
    results, errors = [], []

    def work():
        try:
            for _ in range(3):
                results.append(block_sparse_attn(q, k, v, layout, backend="triton"))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(results) == 12 and all(torch.equal(r, want) for r in results)


@pytest.mark.parametrize("strided", ["q", "k", "v"])
def test_strided_head_dim_is_handled_alike_for_q_k_v(strided, isolated_dispatch_cache, caplog):
    """auto and explicit backends treat a strided head dim of q, k or v the same way (a logged copy)."""
    q, k, v = inputs(4)
    layout = ragged_layout()
    want = block_sparse_attn(q, k, v, layout, backend="reference")
    args = {"q": q, "k": k, "v": v}
    args[strided] = torch.stack([args[strided], args[strided]], -1)[..., 0]   # head-dim stride 2
    assert args[strided].stride(-1) == 2
    for backend in ("auto", "triton"):
        out = block_sparse_attn(args["q"], args["k"], args["v"], layout, backend=backend)
        torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("sizes", [[5, 2.5], [True, False], torch.tensor([5.0, 7.0]), ["5", "7"]])
def test_block_sizes_must_be_integers(sizes):
    """Floats were truncated (2.5 -> 2) and bools counted as 1/0 without a word."""
    with pytest.raises(ValueError, match="q_block_sizes: expected integer block sizes"):
        BlockSparseLayout.from_block_mask(torch.ones(2, 1, dtype=torch.bool), sizes, [4])
