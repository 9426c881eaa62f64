"""FlashInfer backend on CPU: layout conversions, and the whole run path with FlashInfer replaced by exact
torch stand-ins that follow FlashInfer's conventions (NHD/HND layouts, int32 BSR, base-2 lse)."""
import logging
import math
import sys
import types
from importlib.machinery import ModuleSpec

import pytest
import torch

from lvsa_kernels import BackendUnavailable, BlockSparseLayout, LVSAPattern, block_sparse_attn, reference_attention
from lvsa_kernels.backends import flashinfer_backend as fb
from lvsa_kernels.interop import to_flashinfer_bsr

LN2 = math.log(2.0)


# ------------------------------------------------------------------------------------ stand-ins
def _attend(q, k, v, mask, scale):
    """q [M, Hq, D], k/v [N, Hkv, D], mask bool [Hm, M, N] (Hm = 1 or Hkv) -> out [M, Hq, D], lse base 2 [M, Hq]."""
    g = q.shape[1] // k.shape[1]
    kk = k.float().repeat_interleave(g, dim=1)
    vv = v.float().repeat_interleave(g, dim=1)
    s = torch.einsum("mhd,nhd->hmn", q.float(), kk) * scale
    s = s.masked_fill(~mask.repeat_interleave(g, dim=0) if mask.shape[0] > 1 else ~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                                   # [Hq, M] natural
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.einsum("hmn,nhd->mhd", p, vv)
    return out.to(q.dtype), (lse / LN2).transpose(0, 1).contiguous()


class FakeFlashInfer(types.SimpleNamespace):
    """Records plans and calls; each op computes exactly what FlashInfer documents."""

    def __init__(self):
        super().__init__(plans=[], dense_calls=0, __version__="0.0-standin")
        fake = self

        class BlockSparseAttentionWrapper:
            def __init__(self, workspace, backend="auto"):
                self.mask = None

            def plan(self, indptr, indices, M, N, R, C, num_qo_heads, num_kv_heads, head_dim, sm_scale=None,
                     q_data_type="float16", kv_data_type=None, o_data_type="float16"):
                assert indptr.dtype == torch.int32 and indices.dtype == torch.int32
                assert o_data_type == q_data_type and N % C == 0
                fake.plans.append(("bsr", M, N, R, C, num_qo_heads, num_kv_heads))
                self.mask = torch.zeros(1, M, N, dtype=torch.bool)
                for r in range(indptr.numel() - 1):
                    for c in indices[indptr[r]:indptr[r + 1]].tolist():
                        self.mask[0, r * R:(r + 1) * R, c * C:(c + 1) * C] = True
                self.scale = sm_scale

            def run(self, q, k, v, return_lse=False):
                out, lse = _attend(q, k, v, self.mask, self.scale)
                return (out, lse) if return_lse else out

        class VariableBlockSparseAttentionWrapper:
            def __init__(self, workspace, backend="auto"):
                self.mask = None

            def plan(self, block_mask_map, block_row_sz, block_col_sz, num_qo_heads, num_kv_heads, head_dim,
                     sm_scale=None, q_data_type="float16", kv_data_type=None):
                fake.plans.append(("variable", tuple(block_mask_map.shape), num_qo_heads, num_kv_heads))
                rows = [torch.repeat_interleave(torch.arange(block_row_sz.shape[1]), s.long()) for s in block_row_sz]
                cols = [torch.repeat_interleave(torch.arange(block_col_sz.shape[1]), s.long()) for s in block_col_sz]
                self.mask = torch.stack([m[r][:, c] for m, r, c in zip(block_mask_map, rows, cols)])
                self.scale = sm_scale

            def run(self, q, k, v, return_lse=False):             # HND in, HND out (flashinfer #2879)
                out, lse = _attend(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), self.mask, self.scale)
                out = out.transpose(0, 1)
                return (out, lse.transpose(0, 1)) if return_lse else out

        def single_prefill_with_kv_cache(q, k, v, causal=False, sm_scale=None, return_lse=False):
            assert not causal
            fake.dense_calls += 1
            out, lse = _attend(q, k, v, torch.ones(1, q.shape[0], k.shape[0], dtype=torch.bool), sm_scale)
            return (out, lse) if return_lse else out

        self.BlockSparseAttentionWrapper = BlockSparseAttentionWrapper
        self.VariableBlockSparseAttentionWrapper = VariableBlockSparseAttentionWrapper
        self.single_prefill_with_kv_cache = single_prefill_with_kv_cache


@pytest.fixture
def fake_fi(monkeypatch):
    fake = FakeFlashInfer()
    monkeypatch.setattr(fb, "_flashinfer", lambda: fake)
    monkeypatch.setattr(fb, "WORKSPACE_BYTES", 16)
    monkeypatch.setattr(fb, "_workspaces", {})
    return fake


def _qkv(B, Sq, Skv, H, Hkv, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Sq, H, D, generator=g, dtype=dtype), torch.randn(B, Skv, Hkv, D, generator=g, dtype=dtype),
            torch.randn(B, Skv, Hkv, D, generator=g, dtype=dtype))


def _random_layout(seed, nqb, nkb, q_sizes, kv_sizes, heads=1, density=0.4):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(heads, nqb, nkb, generator=g) < density
    mask[:, torch.arange(nqb), torch.arange(nqb) % nkb] = True
    return BlockSparseLayout.from_block_mask(mask if heads > 1 else mask[0], q_sizes, kv_sizes)


def _check(out, lse, q, k, v, layout, scale):
    ref_out, ref_lse = reference_attention(q, k, v, layout, scale=scale, return_lse=True)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ conversions
def _mask_from_bsr(bsr):
    mb = bsr["indptr"].numel() - 1
    m = torch.zeros(mb, bsr["N"] // bsr["C"], dtype=torch.bool)
    for r in range(mb):
        m[r, bsr["indices"][bsr["indptr"][r]:bsr["indptr"][r + 1]].long()] = True
    return m


def test_bsr_arrays_equal_layout():
    layout = _random_layout(1, 5, 6, [8, 8, 8, 8, 5], [4] * 6)
    bsr = to_flashinfer_bsr(layout)
    assert bsr["indptr"].dtype == torch.int32 and bsr["indices"].dtype == torch.int32
    assert (bsr["M"], bsr["N"], bsr["R"], bsr["C"]) == (37, 24, 8, 4)
    assert torch.equal(_mask_from_bsr(bsr), layout.to_block_mask()[0])
    assert fb.layout_plan_kind(layout, 4, 2) == "bsr"


def test_block_diagonal_bsr_is_block_diagonal():
    layout = _random_layout(2, 3, 4, [6] * 3, [5] * 4)
    bsr = to_flashinfer_bsr(layout)
    folded = fb.block_diagonal_bsr(bsr, 3)
    assert (folded["M"], folded["N"], folded["R"], folded["C"]) == (54, 60, 6, 5)
    assert folded["indptr"].dtype == torch.int32 and folded["indices"].dtype == torch.int32
    assert torch.equal(_mask_from_bsr(folded), torch.block_diag(*[layout.to_block_mask()[0]] * 3))
    with pytest.raises(ValueError, match="multiple of R"):
        fb.block_diagonal_bsr(to_flashinfer_bsr(_random_layout(2, 2, 2, [6, 5], [5, 5])), 2)


def test_variable_args_per_kv_head():
    g = torch.Generator().manual_seed(3)
    kv_mask = torch.rand(2, 3, 4, generator=g) < 0.5
    mask = kv_mask.repeat_interleave(2, dim=0)                       # 4 query heads, GQA groups of 2 agree
    q_sizes = [[3, 5, 2]] * 4
    kv_sizes = [[4, 1, 3, 2]] * 4
    layout = BlockSparseLayout.from_block_mask(mask, q_sizes, kv_sizes)
    args = fb.variable_block_args(layout, 4, 2)
    assert torch.equal(args["block_mask_map"], kv_mask)
    assert args["block_row_sz"].dtype == torch.int32 and args["block_col_sz"].dtype == torch.int32
    assert args["block_row_sz"].tolist() == [[3, 5, 2]] * 2 and args["block_col_sz"].tolist() == [[4, 1, 3, 2]] * 2
    assert fb.layout_plan_kind(layout, 4, 2) == "variable"


def test_variable_args_reject_disagreeing_gqa_group():
    mask = torch.ones(4, 2, 2, dtype=torch.bool)
    mask[1, 0, 1] = False                                             # head 1 differs from head 0 (same KV head)
    layout = BlockSparseLayout.from_block_mask(mask, [3, 3], [2, 2])
    with pytest.raises(ValueError, match="GQA group 0"):
        fb.variable_block_args(layout, 4, 2)
    assert fb.variable_block_args(layout, 4, 4)["block_mask_map"].shape == (4, 2, 2)


@pytest.mark.parametrize("position", ["after", "before"])
def test_text_split_of_lvsa_layout(position):
    pat = LVSAPattern(window=1, n_first=1, reference_frames=3, key_frame_interval=3)
    layout = pat.plan(6, 4, text_tokens=5, text_position=position)
    split = fb.text_split(layout)
    video = slice(0, 24) if position == "after" else slice(5, 29)
    text = slice(24, 29) if position == "after" else slice(0, 5)
    assert (split.q_video, split.q_text, split.kv_video, split.kv_text) == (video, text, video, text)
    bsr = split.video_bsr
    assert (bsr["M"], bsr["N"], bsr["R"], bsr["C"]) == (24, 24, 4, 4)
    assert torch.equal(_mask_from_bsr(bsr), pat.frame_mask(6))
    assert fb.layout_plan_kind(layout, 2, 2) == "text"


def test_merge_states_base2_handles_empty_side():
    g = torch.Generator().manual_seed(4)
    o1, o2 = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    l1, l2 = torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g)
    l1[0] = float("-inf")
    o, lse = fb.merge_states_base2(o1, l1, o2, l2)
    torch.testing.assert_close(o[0], o2[0])
    torch.testing.assert_close(lse, torch.logaddexp(l1 * LN2, l2 * LN2) / LN2)
    w1 = torch.exp2(l1[1:] - lse[1:])[..., None]
    torch.testing.assert_close(o[1:], o1[1:] * w1 + o2[1:] * (1 - w1))
    o, lse = fb.merge_states_base2(o1, torch.full_like(l1, -math.inf), o2, torch.full_like(l2, -math.inf))
    assert torch.equal(o, torch.zeros_like(o)) and bool(torch.isneginf(lse).all())


# ------------------------------------------------------------------------------------ run path via stand-ins
def test_standin_lse_is_base_2(fake_fi):
    q, k, v = _qkv(1, 7, 9, 2, 2, 8, seed=5)
    out, lse2 = fake_fi.single_prefill_with_kv_cache(q[0], k[0], v[0], sm_scale=0.3, return_lse=True)
    ref_out, ref_lse = reference_attention(q, k, v, BlockSparseLayout.dense(7, 9), scale=0.3, return_lse=True)
    torch.testing.assert_close(lse2 * LN2, ref_lse[0].transpose(0, 1))
    torch.testing.assert_close(out, ref_out[0])


@pytest.mark.parametrize("B,q_sizes", [(2, [8] * 4), (2, [8, 8, 8, 3]), (1, [8, 8, 8, 3])])
def test_bsr_run_matches_reference(fake_fi, B, q_sizes):
    layout = _random_layout(6, 4, 5, q_sizes, [6] * 5)
    q, k, v = _qkv(B, layout.q_len, layout.kv_len, 4, 2, 16, seed=7)
    out, lse = fb.FlashInferBackend().run(q, k, v, layout, 0.25, True)
    _check(out, lse, q, k, v, layout, 0.25)
    folded = B > 1 and layout.q_len % 8 == 0
    assert fake_fi.plans == [("bsr", B * layout.q_len if folded else layout.q_len,
                              B * layout.kv_len if folded else layout.kv_len, 8, 6, 4, 2)]


@pytest.mark.parametrize("position", ["after", "before"])
def test_text_split_run_matches_reference(fake_fi, position):
    layout = LVSAPattern(window=1, n_first=1, reference_frames=3, key_frame_interval=3).plan(
        7, 6, step=1, text_tokens=5, text_position=position)
    q, k, v = _qkv(2, layout.q_len, layout.kv_len, 4, 2, 16, seed=8)
    out, lse = fb.FlashInferBackend().run(q, k, v, layout, 0.2, True)
    _check(out, lse, q, k, v, layout, 0.2)
    assert fake_fi.dense_calls == 0  # text runs as one-block BSR plans (prebuilt module), never single_prefill
    out2, none = fb.FlashInferBackend().run(q, k, v, layout, 0.2, False)
    assert none is None and torch.equal(out2, out)
    video, to_text, from_text = fake_fi.plans                            # planned once, reused
    assert video[0] == to_text[0] == from_text[0] == "bsr"
    n_text, n_video = 5, layout.q_len - 5
    assert to_text[1:5] == (n_video, n_text, n_video, n_text)           # video queries x text keys: one block
    assert from_text[1:5] == (n_text, layout.kv_len, n_text, layout.kv_len)  # text queries x all keys


def test_variable_run_per_head_gqa_matches_reference(fake_fi):
    g = torch.Generator().manual_seed(9)
    kv_mask = torch.rand(2, 3, 4, generator=g) < 0.5
    kv_mask[:, 1] = False                                                # a query block with no keys: 0 / -inf
    layout = BlockSparseLayout.from_block_mask(kv_mask.repeat_interleave(2, 0), [[5, 3, 4]] * 4, [[2, 6, 3, 5]] * 4)
    q, k, v = _qkv(2, 12, 16, 4, 2, 8, seed=10)
    out, lse = fb.FlashInferBackend().run(q, k, v, layout, 0.35, True)
    _check(out, lse, q, k, v, layout, 0.35)
    assert fake_fi.plans == [("variable", (2, 3, 4), 4, 2)]


def test_plan_is_reused_across_calls_and_keyed_by_scale(fake_fi):
    layout = _random_layout(11, 3, 3, [4] * 3, [4] * 3)
    q, k, v = _qkv(1, 12, 12, 2, 2, 8, seed=12)
    backend = fb.FlashInferBackend()
    for _ in range(3):
        backend.run(q, k, v, layout, 0.5, False)
    assert len(fake_fi.plans) == 1
    backend.run(q, k, v, layout, 0.4, False)
    assert len(fake_fi.plans) == 2


# ------------------------------------------------------------------------------------ availability
def test_unavailable_here_with_reason():
    backend = fb.FlashInferBackend()
    reason = backend.unavailable_reason(torch.device("cpu"))
    if torch.cuda.is_available() and fb._load()[0] is not None:
        pytest.skip("FlashInfer and CUDA are present")
    assert reason and ("flashinfer" in reason.lower() or "CUDA" in reason)
    layout = BlockSparseLayout.dense(8)
    q, k, v = _qkv(1, 8, 8, 2, 2, 8, dtype=torch.float16)
    with pytest.raises(BackendUnavailable, match="flashinfer"):
        block_sparse_attn(q, k, v, layout, backend="flashinfer")


def test_unsupported_layout_reason_names_the_problem(monkeypatch):
    monkeypatch.setattr(fb, "_load", lambda: (object(), None))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    mask = torch.ones(2, 2, 2, dtype=torch.bool)
    mask[1, 0, 0] = False
    layout = BlockSparseLayout.from_block_mask(mask, [4, 4], [4, 4])
    q = torch.randn(1, 8, 2, 8, dtype=torch.float16, device="meta")
    k = torch.randn(1, 8, 1, 8, dtype=torch.float16, device="meta")
    backend = fb.FlashInferBackend()
    backend_caps = backend.caps
    monkeypatch.setattr(backend, "caps", type(backend_caps)(frozenset({"meta"}), backend_caps.dtypes, None))
    assert "GQA group 0" in backend.unsupported_reason(q, k, layout, False)


def test_use_prebuilt_modules_points_aot_dir(monkeypatch, tmp_path, caplog):
    from pathlib import Path

    env = types.ModuleType("flashinfer.jit.env")
    env.FLASHINFER_AOT_DIR = Path("/nonexistent/aot")
    jit = types.ModuleType("flashinfer.jit")
    jit.env = env
    fi = types.ModuleType("flashinfer")
    fi.jit, fi.__version__ = jit, "0.6.7.post3"
    extras = types.ModuleType("fiprep_extras")
    extras.FLASHINFER_VERSION, extras.AOT_DIR = "0.6.7.post3", str(tmp_path)
    for name, mod in (("flashinfer", fi), ("flashinfer.jit", jit), ("flashinfer.jit.env", env), ("fiprep_extras", extras)):
        mod.__spec__ = ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delitem(sys.modules, "flashinfer_jit_cache", raising=False)
    assert fb.use_prebuilt_modules(fi) == str(tmp_path)
    assert env.FLASHINFER_AOT_DIR == tmp_path and isinstance(env.FLASHINFER_AOT_DIR, Path)
    env.FLASHINFER_AOT_DIR = Path("/nonexistent/aot")
    extras.FLASHINFER_VERSION = "0.6.6"
    assert fb.use_prebuilt_modules(fi) is None
    assert env.FLASHINFER_AOT_DIR == Path("/nonexistent/aot")
    assert "not using them" in caplog.text


# ------------------------------------------------------------------------------------ first-use JIT builds
def _stub_flashinfer(monkeypatch, jit_dir):
    """A stand-in ``flashinfer`` module whose JIT folder is ``jit_dir`` (FlashInfer is not installed here)."""
    env = types.ModuleType("flashinfer.jit.env")
    env.FLASHINFER_JIT_DIR = jit_dir
    fi = types.ModuleType("flashinfer")
    fi.jit, fi.__version__ = types.SimpleNamespace(env=env), "0.0-stub"
    monkeypatch.setitem(sys.modules, "flashinfer", fi)
    monkeypatch.setattr(fb, "_ready", set())
    monkeypatch.setattr(fb, "_jit_warned", set())
    return fi


def test_build_needed_until_the_jit_cache_or_a_run_has_the_module(monkeypatch, tmp_path):
    fi = _stub_flashinfer(monkeypatch, tmp_path)
    assert "bfloat16, head dim 96" in fb.build_needed(fi, torch.bfloat16, 96)
    module = tmp_path / "batch_prefill_with_kv_cache_dtype_q_bf16_dtype_kv_bf16_head_dim_qk_96_head_dim_vo_96_x"
    module.mkdir()
    assert fb.build_needed(fi, torch.bfloat16, 96) is not None          # folder without a built library
    (module / "m.so").write_bytes(b"")
    assert fb.build_needed(fi, torch.bfloat16, 96) is None
    assert fb.build_needed(fi, torch.float16, 96) is not None            # other dtype: still a build


def test_one_warning_before_the_first_build(fake_fi, monkeypatch, tmp_path, caplog):
    _stub_flashinfer(monkeypatch, tmp_path)
    plans_at_warning = []

    class Spy(logging.Handler):
        def emit(self, record):
            plans_at_warning.append(len(fake_fi.plans))

    spy = Spy(level=logging.WARNING)
    logging.getLogger("lvsa_kernels").addHandler(spy)
    try:
        q, k, v = _qkv(1, 16, 16, 2, 2, 24)
        layout = _random_layout(0, 2, 2, [8, 8], [8, 8])
        with caplog.at_level(logging.WARNING, logger="lvsa_kernels"):
            for _ in range(2):
                fb.FlashInferBackend().run(q, k, v, layout, 0.2, False)
    finally:
        logging.getLogger("lvsa_kernels").removeHandler(spy)
    assert plans_at_warning == [0]                                      # one WARNING, before anything was planned
    text = caplog.text
    assert "JIT-building" in text and "head dim 24" in text and "minutes" in text and "pre-build" in text
    assert fb.build_needed(sys.modules["flashinfer"], q.dtype, 24) is None   # it ran: ready now
