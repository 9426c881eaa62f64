"""Gradients of `block_sparse_attn` on the Triton backward kernels against float64 reference gradients.

Without CUDA the kernels run in Triton's CPU interpreter (fp32 and fp16: bf16 ``tl.dot`` is wrong there); with
CUDA they run on the GPU and add bf16. Every layout class: LVSA with text (after / before the video), ragged
spans, rows and key blocks without any pair, GQA, per-head layouts (with per-head block sizes), batch > 1.
"""
import pytest
import torch
import triton
import triton.language as tl

from lvsa_kernels import BackendUnavailable, BlockSparseLayout, LVSAPattern, block_sparse_attn, dispatch
from lvsa_kernels import reference_attention
from lvsa_kernels.backends import base as backend_base
from lvsa_kernels.backends.base import Backend, Capabilities
from lvsa_kernels.triton_src.backward_launch import BackwardSchedules, backward_config, launch_backward, run_trainable
from lvsa_kernels.triton_src.block_sparse_bwd import dq_unit
from lvsa_kernels.triton_src.schedule import build_key_schedule, build_pair_masks, build_schedule
from lvsa_kernels.triton_src.tuning import INTERPRETER_CONFIG, KernelConfig, hopper_configs
from test_hopper_kernel import needs_hopper, ragged_layout
from test_triton_kernel import random_layout

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}  # relative (Frobenius) error of each grad


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def layouts():
    no_pairs = torch.tensor([[True, False, True, False], [False, False, False, False], [True, True, False, False]])
    return {
        "lvsa_text_after": (LVSAPattern(window=1, reference_frames=3).plan(5, 12, step=1, text_tokens=7), 1),
        "lvsa_text_before": (LVSAPattern(window=1, reference_frames=3).plan(4, 9, step=2, text_tokens=5,
                                                                          text_position="before"), 1),
        "ragged_empty_rows": (random_layout(seed=3), 1),
        # query block 1 attends nothing, key block 3 is attended by nothing, key block 1 is empty
        "unattended": (BlockSparseLayout.from_block_mask(no_pairs, [9, 6, 21], [17, 0, 13, 5]), 1),
        "per_head": (random_layout(seed=4, heads=4, per_head_sizes=True), 4),
    }


def inputs(layout, B, H, Hkv, D, seed):
    """float64 q, k, v, output gradient and lse gradient (0 on rows without keys, whose lse is -inf)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, layout.q_len, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, layout.kv_len, Hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, layout.kv_len, Hkv, D, generator=g, dtype=torch.float64)
    do = torch.randn(B, layout.q_len, H, D, generator=g, dtype=torch.float64)
    dlse = torch.randn(B, H, layout.q_len, generator=g, dtype=torch.float64)
    return q, k, v, do, dlse


def grads(q, k, v, do, dlse, layout, scale, backend, dtype):
    """(dq, dk, dv) of ``sum(out * do) + sum(lse * dlse)`` over rows with keys, inputs cast to ``dtype``."""
    leaves = [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v)]
    out, lse = block_sparse_attn(*leaves, layout, backend=backend, scale=scale, return_lse=True)
    keys = torch.isfinite(lse)
    loss = (out.double() * do.to(DEVICE)).sum() + (lse.double()[keys] * dlse.to(DEVICE)[keys]).sum()
    return torch.autograd.grad(loss, leaves)


def check_grads(layout, B, H, Hkv, dtype, scale=None, D=16, seed=0):
    q, k, v, do, dlse = inputs(layout, B, H, Hkv, D, seed)
    q, k, v = (t.to(dtype).double() for t in (q, k, v))  # the reference sees the same rounded inputs
    got = grads(q, k, v, do, dlse, layout, scale, "triton", dtype)
    ref = grads(q, k, v, do, dlse, layout, scale, "reference", torch.float64)
    for name, a, b in zip(("dq", "dk", "dv"), got, ref):
        assert a.dtype == dtype and a.shape == b.shape and torch.isfinite(a).all(), name
        assert rel_err(a, b) <= TOL[dtype], (name, rel_err(a, b))
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(layouts()))
def test_gradients_match_float64(name, dtype):
    layout, heads = layouts()[name]
    check_grads(layout, B=2, H=heads, Hkv=heads, dtype=dtype)


@pytest.mark.parametrize("name", ["lvsa_text_after", "per_head"])
def test_gqa_sums_the_group(name):
    """Key heads shared by 2 query heads: dK/dV sum both (shared layouts in one program, per-head ones on the host)."""
    layout, _ = layouts()[name]
    check_grads(layout, B=2, H=4, Hkv=2, dtype=torch.float32)


@pytest.mark.parametrize("scale", [0.0, -0.6, 3.0])
def test_any_scale(scale):
    check_grads(layouts()["ragged_empty_rows"][0], B=1, H=2, Hkv=1, dtype=torch.float32, scale=scale)


@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if CUDA else []))
def test_head_dims_and_strided_inputs(dtype):
    """Head dim 32, q a view into a fused qkv tensor (sequence and head strides of the fused layout); in bf16
    on a Hopper GPU the default launches read these views through tensor descriptors."""
    layout, _ = layouts()["lvsa_text_before"]
    q64, k, v, do, dlse = inputs(layout, 1, 2, 2, 32, 5)
    q64, k, v = (t.to(dtype).double() for t in (q64, k, v))  # the reference sees the same rounded inputs
    fused = torch.cat([q64, k, v], dim=-1).to(DEVICE, dtype).requires_grad_()
    qs, ks, vs = fused.split(32, dim=-1)
    out, lse = block_sparse_attn(qs, ks, vs, layout, backend="triton", return_lse=True)
    keys = torch.isfinite(lse)
    do, dlse = do.to(DEVICE), dlse.to(DEVICE)
    ((out.double() * do).sum() + (lse.double()[keys] * dlse[keys]).sum()).backward()
    ref = grads(q64, k, v, do, dlse, layout, None, "reference", torch.float64)
    assert rel_err(fused.grad, torch.cat(ref, dim=-1)) <= TOL[dtype]


def test_rows_and_keys_without_pairs_get_zero_gradients():
    layout, _ = layouts()["unattended"]
    dq, dk, dv = check_grads(layout, B=1, H=2, Hkv=2, dtype=torch.float32)
    assert (dq[:, 9:15] == 0).all()       # query block 1 attends nothing
    assert (dk[:, 30:] == 0).all() and (dv[:, 30:] == 0).all()  # key block 3 is attended by nothing


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_a_layout_without_pairs_backpropagates_zeros(backend):
    """No key at all: out is 0 without running a backend, and still part of the graph (q's gradient is 0)."""
    layout = BlockSparseLayout.from_block_mask(torch.zeros(2, 2, dtype=torch.bool), [5, 7], [6, 4])
    q, k, v = (t.float().to(DEVICE).requires_grad_() for t in inputs(layout, 1, 2, 2, 16, 8)[:3])
    q.data[0, 0, 0, 0] = float("inf")
    out = block_sparse_attn(q, k, v, layout, backend=backend)
    out.sum().backward()
    assert (out == 0).all() and torch.equal(q.grad, torch.zeros_like(q))


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["lvsa_text", "ragged_gqa", "per_head_gqa"])
def test_hopper_forward_under_autograd(case, dtype):
    """Training where the Hopper kernel won the tuning: its out and lse feed the portable backward (head dim
    128; every Hopper config on the LVSA layout, the default one elsewhere: the forward's configs are
    test_hopper_kernel's); out and the gradients against float64."""
    layout, H, Hkv = {
        "lvsa_text": (LVSAPattern(window=1, reference_frames=2).plan(5, 300, step=1, text_tokens=77), 2, 2),
        "ragged_gqa": (ragged_layout(seed=2), 4, 2),
        "per_head_gqa": (ragged_layout(seed=3, heads=4), 4, 2),
    }[case]
    q, k, v, do, dlse = inputs(layout, 2, H, Hkv, 128, seed=11)
    q, k, v = (t.to(dtype).double() for t in (q, k, v))
    ref_out = reference_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), layout)
    ref = grads(q, k, v, do, dlse, layout, None, "reference", torch.float64)
    for cfg in hopper_configs(128) if case == "lvsa_text" else hopper_configs(128)[:1]:
        leaves = [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v)]
        out, lse = run_trainable(*leaves, layout, 128 ** -0.5, cfg, backward_config(dtype, 128, leaves[0].device))
        assert rel_err(out, ref_out) <= TOL[dtype], (str(cfg), "out")
        keys = torch.isfinite(lse)
        loss = (out.double() * do.to(DEVICE)).sum() + (lse.double()[keys] * dlse.to(DEVICE)[keys]).sum()
        for name, a, b in zip(("dq", "dk", "dv"), torch.autograd.grad(loss, leaves), ref):
            assert torch.isfinite(a).all() and rel_err(a, b) <= TOL[dtype], (str(cfg), name, rel_err(a, b))


@needs_hopper
def test_checkpointed_forward_recomputed_in_the_backward_thread(monkeypatch, isolated_dispatch_cache):
    """Gradient checkpointing recomputes the forward in autograd's device thread, which must find Triton's
    scratch allocator too (the Hopper kernel's tensor descriptors need one); gradients equal the plain ones."""
    from torch.utils.checkpoint import checkpoint

    from lvsa_kernels.backends.triton_backend import AUTOTUNE_ENV, config_for

    monkeypatch.setenv(AUTOTUNE_ENV, "0")  # the first candidate: the Hopper kernel
    layout = LVSAPattern(window=1).plan(5, 300, step=0)
    q, k, v, do, _ = inputs(layout, 1, 2, 2, 128, seed=13)
    leaves = [t.to(DEVICE, torch.bfloat16).requires_grad_() for t in (q, k, v)]
    do = do.to(DEVICE, torch.float32)
    assert config_for(*leaves, layout, 128 ** -0.5).kernel == "hopper"

    def attend(q, k, v):
        return block_sparse_attn(q, k, v, layout, backend="triton")

    plain = torch.autograd.grad((attend(*leaves).float() * do).sum(), leaves)
    recomputed = torch.autograd.grad((checkpoint(attend, *leaves, use_reentrant=False).float() * do).sum(), leaves)
    for a, b in zip(recomputed, plain):
        assert torch.equal(a, b)


def _direct(layout, q, k, v, do, out, lse, fill):
    """`launch_backward` into buffers pre-filled with ``fill``."""
    bwd = backward_config(q.dtype, q.shape[-1], q.device)
    dq, dk, dv = (torch.full_like(t, fill) for t in (q, k, v))
    launch_backward(do, q, k, v, out, lse, None, dq, dk, dv, BackwardSchedules.build(layout, bwd, DEVICE),
                    layout.num_heads > 1, 0.25, bwd)
    return dq, dk, dv


@pytest.mark.parametrize("name", ["unattended", "per_head"])
def test_every_gradient_element_is_written_and_runs_are_identical(name):
    """Buffers poisoned with NaN: the kernels write every element; two runs agree bit for bit (no atomics)."""
    layout, heads = layouts()[name]
    q, k, v, do, _ = (t.float().to(DEVICE) for t in inputs(layout, 2, 4, 2 if heads == 4 else 4, 16, 7))
    out, lse = block_sparse_attn(q, k, v, layout, backend="triton", scale=0.25, return_lse=True)
    first = _direct(layout, q, k, v, do, out, lse, float("nan"))
    assert all(torch.isfinite(t).all() for t in first)
    for a, b in zip(first, _direct(layout, q, k, v, do, out, lse, 7.0)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("use_tma", [False, True])
@pytest.mark.parametrize("name", ["ragged_empty_rows", "per_head"])
def test_backward_tiles_differ_from_the_forward_and_from_each_other(name, use_tma):
    """The forward's tiles (32 x 32) are larger than the backward's: dQ owns query tiles of 16 (handed the
    forward's 32-row schedule it would skip rows), dK/dV key tiles of 16 stepping 32 query rows. Each kernel
    reads its own schedule; both load paths (pointers, tensor descriptors) give the float64 reference's
    gradients."""
    from lvsa_kernels.triton_src.backward_launch import BackwardConfig, BackwardTiles

    if use_tma and CUDA and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need Hopper")
    layout, heads = layouts()[name]
    q, k, v, do, _ = inputs(layout, 2, heads, heads, 16, 11)
    leaves = [t.to(DEVICE, torch.float32).requires_grad_() for t in (q, k, v)]
    bwd = BackwardConfig(dkdv=BackwardTiles(32, 16, 1, 1, use_tma), dq=BackwardTiles(16, 32, 1, 1, use_tma))
    out, _ = run_trainable(*leaves, layout, 0.3, KernelConfig(32, 32, 1, 1), bwd)
    got = torch.autograd.grad((out.double() * do.to(DEVICE)).sum(), leaves)
    ref = grads(q, k, v, do, torch.zeros(2, heads, layout.q_len, dtype=torch.float64), layout, 0.3, "reference",
                torch.float64)
    for a, b in zip(got, ref):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("use_tma", [False, True])
def test_rows_outside_the_spans_never_reach_the_gradients(use_tma):
    """NaN in the q/dO rows of a query block without keys and in the K/V rows of a key block nobody attends:
    ragged tails read past their span's end (descriptor boxes, masked pointer loads), and none of it may leak
    into a gradient. Every gradient equals the reference's on the same inputs with those rows zeroed."""
    from lvsa_kernels.triton_src.backward_launch import BackwardConfig, BackwardTiles

    if use_tma and CUDA and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need Hopper")
    layout, _ = layouts()["unattended"]  # query block 1 (rows 9..14) has no keys; key block 3 (30..34) no queries
    q, k, v, do, _ = inputs(layout, 1, 2, 2, 16, 17)
    for t, rows in ((q, slice(9, 15)), (do, slice(9, 15)), (k, slice(30, 35)), (v, slice(30, 35))):
        t[:, rows] = 0.0
    ref = grads(q.clone(), k.clone(), v.clone(), do, torch.zeros(1, 2, layout.q_len, dtype=torch.float64), layout,
                0.4, "reference", torch.float64)
    for t, rows in ((q, slice(9, 15)), (do, slice(9, 15)), (k, slice(30, 35)), (v, slice(30, 35))):
        t[:, rows] = float("nan")
    leaves = [t.to(DEVICE, torch.float32).requires_grad_() for t in (q, k, v)]
    tiles = BackwardTiles(16, 16, 1, 1, use_tma)
    out, _ = run_trainable(*leaves, layout, 0.4, KernelConfig(16, 16, 1, 1), BackwardConfig(tiles, tiles))
    keys = torch.ones(layout.q_len, dtype=torch.bool)
    keys[9:15] = False
    loss = (out[:, keys].double() * do[:, keys].to(DEVICE)).sum()  # out of rows without keys is 0 either way
    got = torch.autograd.grad(loss, leaves)
    for a, b in zip(got, ref):
        assert torch.isfinite(a).all() and rel_err(a, b) <= 1e-5


def test_default_backward_launches_fit_the_device_shared_memory(monkeypatch):
    """Half precision: the Hopper-sized launches (up to 165 KiB of shared memory) only where a block may use
    200 KiB or more; an A100 or an Ada GPU gets the small launches; fp32 and CPU callers are unaffected."""
    from lvsa_kernels.triton_src import backward_launch as bl

    monkeypatch.setattr(bl, "interpreting", lambda: False)
    cuda = torch.device("cuda", 0)
    for smem, small in ((232448, False), (166912, True), (101376, True)):
        monkeypatch.setattr(bl, "_shared_memory", lambda device, smem=smem: smem)
        cfg = bl.backward_config(torch.bfloat16, 128, cuda)
        assert (cfg == bl._SMALL_SMEM_BACKWARD) == small and cfg.dkdv.use_tma == (not small)
        assert bl.backward_config(torch.float32, 128, cuda).dkdv.block_n == 32
    assert bl.backward_config(torch.bfloat16, 128) == bl.backward_config(torch.bfloat16, 128, torch.device("cpu"))


@pytest.mark.parametrize("name", ["lvsa_text_after", "ragged_empty_rows", "per_head", "unattended"])
def test_single_pass_backward_through_autograd(name):
    """`BackwardConfig(dq=None)`: the differentiable op's backward runs the single pass (dQ from the dK/dV
    kernel's atomics): gradients, the lse's included, equal the float64 reference's, with GQA."""
    from lvsa_kernels.triton_src.backward_launch import BackwardConfig

    layout, heads = layouts()[name]
    H = max(2, heads)  # GQA: two query heads per key head
    q, k, v, do, dlse = inputs(layout, 2, H, H // 2, 16, 23)
    leaves = [t.to(DEVICE, torch.float32).requires_grad_() for t in (q, k, v)]
    bwd = BackwardConfig(backward_config(torch.float32, 16, leaves[0].device).dkdv, None)
    out, lse = run_trainable(*leaves, layout, 0.3, INTERPRETER_CONFIG if not CUDA else KernelConfig(32, 32, 4, 2), bwd)
    keys = torch.isfinite(lse)
    loss = (out.double() * do.to(DEVICE)).sum() + (lse.double()[keys] * dlse.to(DEVICE)[keys]).sum()
    got = torch.autograd.grad(loss, leaves)
    ref = grads(q.clone(), k.clone(), v.clone(), do, dlse, layout, 0.3, "reference", torch.float64)
    for a, b in zip(got, ref):
        assert torch.isfinite(a).all() and rel_err(a, b) <= 1e-5


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")  # the padding keys' P, on purpose
def test_single_pass_leaves_padding_keys_out_of_dq():
    """A short key tile's padding keys have dS = inf when a row's lse is far below 0 (here about -200: P of a zero
    key is exp(0 - lse)); the single pass must keep them out of dQ's sum over keys."""
    from lvsa_kernels.triton_src.backward_launch import BackwardConfig, BackwardTiles

    layout, _ = layouts()["unattended"]  # key blocks of 17, 13 and 5 keys: every 16-key tile set has a short one
    g = torch.Generator().manual_seed(31)
    q, k, v, do = (torch.rand(1, n, 2, 16, generator=g, dtype=torch.float64) + 3.0
                   for n in (layout.q_len, layout.kv_len, layout.kv_len, layout.q_len))
    ref = grads(q.clone(), k.clone(), v.clone(), do, torch.zeros(1, 2, layout.q_len, dtype=torch.float64), layout,
                -1.0, "reference", torch.float64)
    leaves = [t.to(DEVICE, torch.float32).requires_grad_() for t in (q, k, v)]
    tiles = BackwardTiles(16, 16, 1, 1)
    out, lse = run_trainable(*leaves, layout, -1.0, KernelConfig(16, 16, 1, 1), BackwardConfig(tiles, None))
    assert lse[torch.isfinite(lse)].max() < -100
    got = torch.autograd.grad((out.double() * do.to(DEVICE)).sum(), leaves)
    for a, b in zip(got, ref):  # fp32 scores near -200 carry ~2e-5 absolute rounding each: 1e-3, not 1e-5
        assert torch.isfinite(a).all() and rel_err(a, b) <= 1e-3


def _single_pass(layout, q, k, v, do, dlse, scale, sched):
    """The single pass alone at 16-row steps over key schedule ``sched``: (dq, its int64 sums, dq_unit)."""
    from lvsa_kernels.triton_src.backward_launch import BackwardTiles, launch_single_pass

    out, lse = block_sparse_attn(q, k, v, layout, backend="triton", scale=scale, return_lse=True)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _, acc, unit = launch_single_pass(do, q, k, v, out, lse, dlse, dq, dk, dv, sched,
                                      build_pair_masks(layout, q.device), layout.num_heads > 1, scale,
                                      BackwardTiles(16, 16, 1, 1))
    return dq, acc, unit


def _reversed_tiles(sched):
    """``sched`` with each layout head's key tiles in reverse order (so are the programs, and the order in which
    they add to a row's dQ)."""
    import dataclasses

    order = torch.cat([torch.arange(int(b) - 1, int(a) - 1, -1) for a, b in zip(sched.tile_ptr[:-1].cpu(),
                                                                                    sched.tile_ptr[1:].cpu())])
    order = order.to(sched.tile_start.device)
    return dataclasses.replace(sched, tile_start=sched.tile_start[order], tile_end=sched.tile_end[order],
                               tile_row=sched.tile_row[order])


@pytest.mark.parametrize("name", ["lvsa_text_after", "per_head"])
def test_single_pass_dq_does_not_depend_on_the_order_of_key_tiles(name):
    """The single pass's dQ sums are integers: the key tiles adding in reverse order give the same bits (float32
    atomics would not: rows here take up to 6 shares, and their rounding depends on the order), and equal the
    dQ kernel's result within float32 rounding."""
    layout, heads = layouts()[name]
    H = max(heads, 4)
    q, k, v, do, dlse = (t.float().to(DEVICE) for t in inputs(layout, 2, H, H // 2, 16, 21))
    sched = build_key_schedule(layout, 16, DEVICE)
    dq, acc, _ = _single_pass(layout, q, k, v, do, dlse, 0.3, sched)
    dq_rev, acc_rev, _ = _single_pass(layout, q, k, v, do, dlse, 0.3, _reversed_tiles(sched))
    assert torch.equal(acc, acc_rev) and torch.equal(dq, dq_rev)
    want = grads(q, k, v, do, dlse, layout, 0.3, "triton", torch.float32)[0]
    assert rel_err(dq, want) <= 1e-6


def test_single_pass_sums_stay_within_their_bound():
    """Peaked scores, a large lse gradient and a negative scale: every int64 sum stays below 2^61 units (the
    bound of `dq_unit`), and the unit is fine enough that dq equals the float64 reference to float32 rounding."""
    layout, _ = layouts()["ragged_empty_rows"]
    q, k, v, do, dlse = inputs(layout, 1, 2, 1, 16, 22)
    q, dlse = q * 6.0, dlse * 100.0
    dq, acc, unit = _single_pass(layout, *(t.float().to(DEVICE) for t in (q, k, v, do, dlse)), -1.3,
                                 build_key_schedule(layout, 16, DEVICE))
    assert acc.abs().max() < 2 ** 61 and acc.abs().max() > 2 ** 40
    assert torch.equal(unit, torch.exp2(torch.log2(unit).round()))  # powers of two
    keys = torch.isfinite(block_sparse_attn(q, k, v, layout, backend="reference", scale=-1.3, return_lse=True)[1])
    ref = grads(q, k, v, do, dlse * keys, layout, -1.3, "reference", torch.float64)[0]
    assert rel_err(dq, ref) <= 1e-5


def test_single_pass_bound_is_tight_and_holds():
    """Inputs where dQ reaches the bound's exact part (uniform P, keys +-c in every channel and values +-v along
    dO with signs matching, so every share adds up): the sums, times kv_len (the bound's headroom), land in
    [2^60, 2^61), so the bound is neither loose nor short (e.g. built from the largest value entry instead of the
    largest value norm), and dq equals the reference."""
    layout = BlockSparseLayout.from_block_mask(torch.ones(1, 1, dtype=torch.bool), [8], [32])
    sign = torch.tensor([1.0, -1.0]).repeat(16).double()
    u = torch.randn(16, generator=torch.Generator().manual_seed(24), dtype=torch.float64)
    q = torch.zeros(1, 8, 1, 16, dtype=torch.float64)
    k = (3.0 * sign[:, None]).expand(32, 16).reshape(1, 32, 1, 16)
    v = (0.5 * sign[:, None] * u).reshape(1, 32, 1, 16)
    do = u.expand(1, 8, 1, 16)
    dq, acc, _ = _single_pass(layout, *(t.float().to(DEVICE) for t in (q, k, v, do)), None, 0.7,
                              build_key_schedule(layout, 16, DEVICE))
    ratio = layout.kv_len * acc.abs().max().item() / 2 ** 60
    assert 1 - 1e-6 <= ratio < 2, ratio
    ref = grads(q, k, v, do, torch.zeros(1, 1, 8, dtype=torch.float64), layout, 0.7, "reference", torch.float64)[0]
    assert rel_err(dq, ref) <= 1e-6


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN shares
def test_single_pass_bounds_each_query_head_on_its_own_keys():
    """Per-head layout, two query heads on one key head, head 0 alone attending key block 1: a large key there
    leaves head 1's units unchanged, and a -inf there makes head 0's dq NaN and leaves head 1's bits alone."""
    masks = torch.tensor([[[True, True], [True, False]], [[True, False], [True, False]]])
    layout = BlockSparseLayout.from_block_mask(masks, [12, 9], [10, 14])
    q, k, v, do, dlse = (t.float().to(DEVICE) for t in inputs(layout, 1, 2, 1, 16, 26))
    sched = build_key_schedule(layout, 16, DEVICE)
    clean_dq, _, clean_unit = _single_pass(layout, q, k, v, do, dlse, 0.5, sched)
    k_big = k.clone()
    k_big[0, 15, 0, 3] = 50.0  # key block 1: only head 0 attends it
    dq, _, unit = _single_pass(layout, q, k_big, v, do, dlse, 0.5, sched)
    assert torch.equal(unit[:, 1], clean_unit[:, 1]) and (unit[:, 0] > clean_unit[:, 0]).all()
    want = grads(q.clone(), k_big.clone(), v.clone(), do, dlse, layout, 0.5, "triton", torch.float32)[0]
    assert rel_err(dq, want) <= 1e-6
    k_big[0, 15, 0, 3] = float("-inf")
    dq = _single_pass(layout, q, k_big, v, do, dlse, 0.5, sched)[0]
    assert dq[:, :, 0].isnan().all() and torch.equal(dq[:, :, 1], clean_dq[:, :, 1])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN shares
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
def test_single_pass_non_finite_inputs():
    """NaN or inf inputs: a key no query attends (even a huge finite one) leaves dq's bits unchanged; an attended
    key holding -inf (score -inf, so out and lse stay finite) makes its head's dq NaN (the dQ kernel: the rows
    attending it); a NaN q or lse gradient makes only its row NaN, and a row without keys stays 0 whatever its
    lse gradient, as with the dQ kernel."""
    layout, _ = layouts()["unattended"]  # keys 30.. are attended by nothing; query rows 9..14 attend nothing
    q, k, v, do, dlse = (t.float().to(DEVICE) for t in inputs(layout, 1, 2, 2, 16, 23))
    sched = build_key_schedule(layout, 16, DEVICE)

    def single(q=q, k=k, v=v, dlse=dlse):
        return _single_pass(layout, q, k, v, do, dlse, 0.5, sched)[0]

    def dq_kernel(q=q, k=k, v=v, dlse=dlse):
        return grads(q, k, v, do, dlse, layout, 0.5, "triton", torch.float32)[0]

    clean = single()
    k_out, v_out = k.clone(), v.clone()
    k_out[0, 31, 1, 2], k_out[0, 32, 0, 0], v_out[0, 33, 0, 0] = float("nan"), 1e30, float("inf")
    assert torch.equal(single(k=k_out, v=v_out), clean)

    k_in = k.clone()
    k_in[0, 3, 1, :] = float("-inf")  # key block 0 of head 1
    got, want = single(k=k_in), dq_kernel(k=k_in)
    assert want[0, :, 1].isnan().any() and not want[0, :, 0].isnan().any()
    assert got[0, :, 1][want[0, :, 1].isnan().any(-1)].isnan().all()
    assert torch.equal(got[0, :, 0], clean[0, :, 0])

    q_in, dlse_in = q.clone(), dlse.clone()
    q_in[0, 2, 0, 5], dlse_in[0, 1, 20], dlse_in[0, :, 9:15] = float("nan"), float("nan"), float("nan")
    got, want = single(q=q_in, dlse=dlse_in), dq_kernel(q=q_in, dlse=dlse_in)
    assert torch.equal(got.isnan(), want.isnan()) and got[0, 2, 0].isnan().all() and got[0, 20, 1].isnan().all()
    assert (got[0, 9:15] == 0).all()
    finite = ~want.isnan()
    assert rel_err(got[finite], want[finite]) <= 1e-6


@pytest.mark.parametrize("scale", [1e-30, 40.0, -1e4])
def test_single_pass_any_scale_with_zero_rows(scale):
    """Any finite scale, with a row whose output gradient is 0 (its bound is 0: the smallest unit): dq as close
    to float64 as the dQ kernel's, or closer (at scale -1e4 float32 scores carry errors that push recomputed P
    above 1; the single pass clamps it)."""
    layout, _ = layouts()["ragged_empty_rows"]
    q, k, v, do, dlse = inputs(layout, 1, 2, 1, 16, 25)
    do[0, 4], dlse[0, :, 4] = 0.0, 0.0
    f32 = [t.float().to(DEVICE) for t in (q, k, v, do, dlse)]
    dq = _single_pass(layout, *f32, scale, build_key_schedule(layout, 16, DEVICE))[0]
    want = grads(*f32, layout, scale, "triton", torch.float32)[0]
    keys = torch.isfinite(block_sparse_attn(q, k, v, layout, backend="reference", scale=scale, return_lse=True)[1])
    ref = grads(q, k, v, do, dlse * keys, layout, scale, "reference", torch.float64)[0]
    assert torch.isfinite(dq).all() and (dq[0, 4] == 0).all() and ref.abs().max() > 0
    assert rel_err(dq, ref) <= max(1e-5, rel_err(want, ref))


@triton.jit
def _dq_units(B, U, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(U + offs, dq_unit(tl.load(B + offs, mask=offs < n, other=0.0)), mask=offs < n)


def test_dq_unit_is_a_power_of_two_above_the_bound():
    """`dq_unit`: the bound lies in [2^60, 2^61) units (bounds from 2^-65 up; below, the smallest unit 2^-126),
    unit and 1 / unit are normal floats, and a bound that is not finite gives NaN."""
    bounds = torch.tensor([0.0, 1e-45, 1e-30, 2.0 ** -65, 0.7, 1.0, 2.0, 3.0, 1e20, 2.0 ** 100, 3.4e38,
                           float("inf"), float("nan")], device=DEVICE)
    unit = torch.empty_like(bounds)
    _dq_units[(1,)](bounds, unit, bounds.numel(), BLOCK=16)
    finite, big = unit[:-2], bounds[:-2].double() >= 2.0 ** -65
    assert torch.equal(finite, torch.exp2(torch.log2(finite).round()))
    assert (finite >= 2.0 ** -126).all() and torch.isfinite(1.0 / finite).all()
    assert (finite.double()[big] * 2.0 ** 60 <= bounds[:-2].double()[big]).all()
    assert (finite.double()[big] * 2.0 ** 61 > bounds[:-2].double()[big]).all()
    assert (finite[~big] == 2.0 ** -126).all()
    assert unit[-2:].isnan().all()


def test_the_shared_memory_query_traces_under_torch_compile(monkeypatch):
    """A compiled training step picks the backward launches inside the trace: the device query (Triton's driver,
    which dynamo cannot trace; here a stand-in reading a frame) is read as a constant, not a graph break."""
    import sys

    from lvsa_kernels.triton_src import backward_launch as bl

    monkeypatch.setattr(bl, "interpreting", lambda: False)
    monkeypatch.setattr(bl, "_SHARED_MEMORY", {})
    monkeypatch.setattr(bl, "_device_query", lambda index: (sys._getframe(), 101376)[1])

    @torch.compile(fullgraph=True, backend="eager")
    def step(x):
        return x + bl.backward_config(torch.bfloat16, 128, torch.device("cuda", 0)).dkdv.block_m

    assert step(torch.zeros(1)).item() == bl._SMALL_SMEM_BACKWARD.dkdv.block_m


def test_trainable_forward_refuses_configs_it_cannot_run():
    """The differentiable forward shares the inference launch's config checks: an unknown kernel or an exp2
    split on the portable kernel is an error, not a silent portable run."""
    from lvsa_kernels.triton_src.tuning import KernelConfig

    layout, _ = layouts()["lvsa_text_after"]
    q, k, v = (t.float().to(DEVICE) for t in inputs(layout, 1, 2, 2, 16, 3)[:3])
    bwd = backward_config(q.dtype, 16)
    with pytest.raises(ValueError, match="cfg.kernel: expected 'portable' or 'hopper', got 'fast'"):
        run_trainable(q, k, v, layout, 0.25, KernelConfig(16, 16, 1, 1, kernel="fast"), bwd)
    with pytest.raises(ValueError, match="cfg.exp2_poly: expected 0 or 4"):
        run_trainable(q, k, v, layout, 0.25, KernelConfig(16, 16, 1, 1, exp2_poly=4), bwd)


def test_key_schedule_is_built_once_per_layout():
    layout, _ = layouts()["lvsa_text_after"]
    assert build_key_schedule(layout, 16, DEVICE) is build_key_schedule(layout, 16, DEVICE)


def compiled_step_grads(layout, dtype, head_dim, seed):
    """(dq, dk, dv) of a ``torch.compile(fullgraph=True)`` step after one eager step (which fills the tune and
    schedule caches), and the float64 reference's, on inputs rounded to ``dtype``."""
    q, k, v, do, _ = inputs(layout, 1, 2, 2, head_dim, seed)
    q, k, v = (t.to(dtype).double() for t in (q, k, v))
    leaves = [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v)]
    block_sparse_attn(*leaves, layout, backend="triton").sum().backward()

    @torch.compile(fullgraph=True, backend="eager" if not CUDA else "inductor")
    def f(q, k, v):
        return block_sparse_attn(q, k, v, layout, backend="triton")

    got = torch.autograd.grad((f(*leaves).double() * do.to(DEVICE)).sum(), leaves)
    ref = grads(q, k, v, do, torch.zeros(1, 2, layout.q_len, dtype=torch.float64), layout, None, "reference",
                torch.float64)
    return got, ref, leaves


def test_compiled_training_step_traces_through_forward_and_backward():
    got, ref, _ = compiled_step_grads(layouts()["lvsa_text_after"][0], torch.float32, 16, seed=9)
    for a, b in zip(got, ref):
        assert rel_err(a, b) <= TOL[torch.float32]


@needs_hopper
def test_compiled_training_step_on_the_hopper_forward(monkeypatch, isolated_dispatch_cache):
    """The compiled step with the Hopper kernel as its forward (bf16, head dim 128, autotuning off)."""
    from lvsa_kernels.backends.triton_backend import AUTOTUNE_ENV, config_for

    monkeypatch.setenv(AUTOTUNE_ENV, "0")
    layout = LVSAPattern(window=1).plan(5, 300, step=0, text_tokens=40)
    got, ref, leaves = compiled_step_grads(layout, torch.bfloat16, 128, seed=14)
    assert config_for(*leaves, layout, 128 ** -0.5).kernel == "hopper"
    for a, b in zip(got, ref):
        assert rel_err(a, b) <= TOL[torch.bfloat16]


def test_fake_backward_gives_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    layout, _ = layouts()["ragged_empty_rows"]
    qs, ks = build_schedule(layout, 16, torch.device(DEVICE)), build_key_schedule(layout, 16, torch.device(DEVICE))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        q = mode.from_tensor(torch.empty(2, layout.q_len, 4, 32, device=DEVICE))
        k = mode.from_tensor(torch.empty(2, layout.kv_len, 2, 32, device=DEVICE))
        lse = mode.from_tensor(torch.empty(2, 4, layout.q_len, device=DEVICE))
        dq, dk, dv = torch.ops.lvsa_kernels.triton_block_sparse_bwd(
            q, q, k, k, q, lse, None, list(qs.tensors()), list(ks.tensors()), qs.max_tiles, ks.max_tiles, False,
            0.1, [16, 16, 1, 1, 0, 16, 16, 1, 1, 0])
    assert dq.shape == q.shape and dk.shape == dv.shape == k.shape


class ForwardOnly(Backend):
    """A sparse CPU backend without a backward (as FlashInfer and NPU are), always the fastest."""

    name = "forward_only"
    caps = Capabilities(devices=frozenset({"cpu", "cuda"}), dtypes=frozenset({torch.float32}), head_dims=None)

    def run(self, q, k, v, layout, scale, return_lse):
        with torch.no_grad():
            out, lse = reference_attention(q, k, v, layout, scale=scale, return_lse=True)
        return out, (lse if return_lse else None)


@pytest.fixture
def forward_only(monkeypatch, isolated_dispatch_cache):
    monkeypatch.setitem(backend_base._REGISTRY, "forward_only", ForwardOnly())
    monkeypatch.setattr(dispatch, "PREFERENCE", ("forward_only",) + dispatch.PREFERENCE)


def test_a_backend_without_backward_refuses_inputs_that_require_grad(forward_only):
    layout, _ = layouts()["ragged_empty_rows"]
    q, k, v = (t.float().to(DEVICE).requires_grad_() for t in inputs(layout, 1, 2, 2, 16, 1)[:3])
    with pytest.raises(BackendUnavailable, match="backend 'forward_only' .* has no backward .*requires grad"):
        block_sparse_attn(q, k, v, layout, backend="forward_only")
    with torch.no_grad():
        assert block_sparse_attn(q, k, v, layout, backend="forward_only").shape == q.shape


def test_auto_picks_a_backend_with_a_backward(forward_only, monkeypatch):
    """``auto`` never times or picks the forward-only backend for inputs that require grad."""
    layout, _ = layouts()["lvsa_text_after"]
    q, k, v, do, dlse = inputs(layout, 1, 2, 2, 16, 2)
    got = grads(q, k, v, do, dlse, layout, None, "auto", torch.float32)
    ref = grads(q, k, v, do, dlse, layout, None, "reference", torch.float64)
    assert all(rel_err(a, b) <= TOL[torch.float32] for a, b in zip(got, ref))
    leaves = [t.float().to(DEVICE).requires_grad_() for t in (q, k, v)]
    assert dispatch.select_backend("auto", *leaves, layout, 0.25, True).name == "triton"


def test_8bit_precision_refuses_gradients():
    layout, _ = layouts()["ragged_empty_rows"]
    q, k, v = (t.half().to(DEVICE).requires_grad_() for t in inputs(layout, 1, 2, 2, 32, 1)[:3])
    with pytest.raises(BackendUnavailable, match="precision='fp8' has no backward"):
        block_sparse_attn(q, k, v, layout, backend="triton", precision="fp8")
    with torch.no_grad():
        assert block_sparse_attn(q, k, v, layout, backend="triton", precision="fp8").shape == q.shape


@pytest.mark.skipif(not CUDA, reason="bf16 at the GPU tile sizes (64-key tiles, head dim 128) needs a CUDA device")
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2)])
def test_gpu_bf16_wan_like_gradients(heads, kv_heads):
    """A Wan-like LVSA layout with text: 200-token frames (ragged against every tile width), head dim 128."""
    layout = LVSAPattern(window=1, n_first=1, reference_frames=3).plan(7, 200, step=1, text_tokens=40)
    check_grads(layout, B=2, H=heads, Hkv=kv_heads, dtype=torch.bfloat16, D=128, seed=11)
