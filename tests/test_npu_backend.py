"""NPU backend against the CPU stand-in of torch_npu (tests/npu_standin.py): detection, grouping, masks,
GQA and outputs vs reference_attention. Nothing here runs on Ascend hardware."""
import importlib.abc
import importlib.machinery
import sys

import pytest
import torch

import npu_standin
from lvsa_kernels import BackendUnavailable, BlockSparseLayout, LVSAPattern, block_sparse_attn, reference_attention
from lvsa_kernels import choice, dispatch
from lvsa_kernels.npu import backend as nb
from lvsa_kernels.npu.detect import load_torch_npu
from lvsa_kernels.npu.groups import span_groups, tile_grid
from random_inputs import random_qkv

pytestmark = pytest.mark.usefixtures("isolated_dispatch_cache")


def _distinct_span_lists(layout):
    sp = layout.spans
    lists = set()
    q_sizes = layout.block_sizes()[0].expand(layout.num_heads, -1)
    for h in range(layout.num_heads):
        for r in range(layout.num_q_blocks):
            a, b = int(sp.ptr[h, r]), int(sp.ptr[h, r + 1])
            if b > a and q_sizes[h, r] > 0:
                lists.add((h, tuple(zip(sp.start[a:b].tolist(), sp.end[a:b].tolist()))))
    return len(lists)


def _assert_matches_reference(out, lse, q, k, v, layout, scale, tol):
    ref_out, ref_lse = reference_attention(q, k, v, layout, scale=scale, return_lse=True)
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5 if q.dtype == torch.float32 else 1e-3)


# ------------------------------------------------------------------------------------ detection
def test_unavailable_without_torch_npu():
    assert "torch_npu" not in sys.modules
    module, reason = load_torch_npu()
    assert module is None and "not installed" in reason
    q, k, v = random_qkv(1, 8, 8, 2, 2, 8, seed=0)
    with pytest.raises(BackendUnavailable, match="torch_npu"):
        block_sparse_attn(q, k, v, BlockSparseLayout.dense(8), backend="npu")


class _BrokenFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds torch_npu, then fails to load it the way a wheel without CANN does."""

    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name == "torch_npu" else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise OSError("libhccl.so: cannot open shared object file")


def test_import_failure_is_reported(monkeypatch):
    monkeypatch.setattr(sys, "meta_path", [_BrokenFinder()] + sys.meta_path)
    module, reason = load_torch_npu()
    assert module is None and "libhccl.so" in reason and "import torch_npu" in reason


def test_no_device_is_reported(monkeypatch):
    npu_standin.install(monkeypatch, available=False)
    assert "is_available() is False" in nb.NpuBackend().unavailable_reason(torch.device("cpu"))


def test_cpu_tensors_need_the_standin_hook(monkeypatch):
    mod = npu_standin.install(monkeypatch)
    monkeypatch.delattr(mod, "LVSA_KERNELS_CPU_STANDIN")
    q, k, v = random_qkv(1, 8, 8, 2, 2, 8, seed=0)
    reason = nb.NpuBackend().unsupported_reason(q, k, BlockSparseLayout.dense(8), False)
    assert reason and "['npu']" in reason


# ------------------------------------------------------------------------------------ fusion variant
@pytest.mark.parametrize("text_position", ["after", "before"])
def test_fusion_groups_masks_and_outputs(monkeypatch, text_position):
    mod = npu_standin.install(monkeypatch)
    layout = LVSAPattern(window=1, n_first=1, reference_frames=3, key_frame_interval=3).plan(
        8, 5, step=1, text_tokens=3, text_position=text_position)
    q, k, v = random_qkv(2, layout.q_len, layout.kv_len, 4, 2, 8, seed=1)
    out, lse = block_sparse_attn(q, k, v, layout, backend="npu", scale=0.3, return_lse=True)
    _assert_matches_reference(out, lse, q, k, v, layout, 0.3, 1e-5)
    calls = [c for name, c in mod.calls if name == "npu_fusion_attention"]
    assert len(calls) == _distinct_span_lists(layout) == len(span_groups(layout))
    assert len(calls) < layout.num_q_blocks                  # blocks sharing a span list share a call
    for c in calls:
        assert c["atten_mask"] is None and c["head_num"] == 4 and c["k_shape"][2] == 2 and c["scale"] == 0.3
    assert sum(c["q_shape"][1] for c in calls) == layout.q_len


def test_fusion_per_head_layout_with_gqa_and_empty_rows(monkeypatch):
    mod = npu_standin.install(monkeypatch)
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(4, 4, 5, generator=g) < 0.45
    mask[2, 1] = False                                       # head 2, query block 1: no keys -> 0 / -inf
    mask[0, 3] = True
    layout = BlockSparseLayout.from_block_mask(mask, [[3, 4, 2, 5]] * 4, [[2, 3, 4, 1, 3]] * 4)
    q, k, v = random_qkv(1, 14, 13, 4, 2, 8, seed=3)
    out, lse = block_sparse_attn(q, k, v, layout, backend="npu", return_lse=True)
    _assert_matches_reference(out, lse, q, k, v, layout, 8 ** -0.5, 1e-5)
    calls = [c for name, c in mod.calls if name == "npu_fusion_attention"]
    assert len(calls) == _distinct_span_lists(layout)
    assert all(c["head_num"] == 1 and c["k_shape"][2] == 1 for c in calls)


# ------------------------------------------------------------------------------------ block-sparse variant
def _grid_layout(heads=1, seed=4):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(heads, 3, 3, generator=g) < 0.5
    mask[:, torch.arange(3), torch.arange(3)] = True
    return BlockSparseLayout.from_block_mask(mask if heads > 1 else mask[0], [64, 128, 100], [256, 128, 200])


def test_tile_grid_is_exact():
    layout = _grid_layout()
    grid = tile_grid(layout)
    assert (grid.x, grid.y) == (64, 128)
    tok = layout.to_token_mask()[0]
    tiles = tok[::64][:, ::128]
    assert torch.equal(grid.mask[0], tiles)
    assert isinstance(tile_grid(LVSAPattern().plan(30, 12)), str)          # 12-token frames: no 128 grid


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_block_sparse_variant_mask_and_output(monkeypatch, dtype):
    mod = npu_standin.install(monkeypatch)
    layout = _grid_layout(heads=4)
    q, k, v = random_qkv(2, layout.q_len, layout.kv_len, 4, 2, 64, seed=5, dtype=dtype)
    out, lse = nb.run_block_sparse(mod, q, k, v, layout, 0.125, True)
    ref_out, ref_lse = reference_attention(q, k, v, layout, scale=0.125, return_lse=True)
    tol = 1e-3 if dtype == torch.float16 else 1e-2
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4)
    (name, call), = mod.calls
    assert name == "npu_block_sparse_attention" and call["block_shape"] == [64, 128]
    assert call["num_key_value_heads"] == 2 and call["inner_precise"] == (0 if dtype == torch.bfloat16 else 1)
    expected = tile_grid(layout).mask.to(torch.int8)[None].expand(2, -1, -1, -1)
    assert torch.equal(call["mask"], expected)


def test_variant_chosen_by_measurement_and_cached(monkeypatch, tmp_path):
    npu_standin.install(monkeypatch)
    timed = []
    real_measure = choice.measure
    monkeypatch.setattr(choice, "measure", lambda fn, dev: timed.append(1) or real_measure(fn, dev))
    layout = _grid_layout()
    q, k, v = random_qkv(1, layout.q_len, layout.kv_len, 2, 2, 64, seed=6, dtype=torch.float16)
    for _ in range(2):
        out = block_sparse_attn(q, k, v, layout, backend="npu")
        torch.testing.assert_close(out, reference_attention(q, k, v, layout), rtol=1e-3, atol=1e-3)
    assert len(timed) == 2                                   # both variants timed once, then cached
    entries = dispatch.cached_choices()
    (key, entry), = [(k_, e) for k_, e in entries.items() if k_.startswith("npu-op|")]
    assert entry["winner"] in ("fusion", "block_sparse") and set(entry["times_ms"]) == {"fusion", "block_sparse"}
    assert (tmp_path / "backends.json").exists()


def test_fp32_runs_fusion_only_without_timing(monkeypatch):
    mod = npu_standin.install(monkeypatch)
    monkeypatch.setattr(choice, "measure", lambda fn, dev: pytest.fail("nothing to choose between"))
    layout = _grid_layout()
    q, k, v = random_qkv(1, layout.q_len, layout.kv_len, 2, 1, 64, seed=7)
    block_sparse_attn(q, k, v, layout, backend="npu")
    assert {name for name, _ in mod.calls} == {"npu_fusion_attention"}
