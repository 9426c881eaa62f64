"""LVSA and SVOO under diffusers' own context parallelism: 2 CPU processes (gloo) vs one process.

Two ranks (torch.multiprocessing.spawn, gloo, a FileStore in the test's tmp dir) run a tiny random Wan
transformer (4 heads x 16) under ``enable_parallelism(ContextParallelConfig(ulysses_degree=2))`` (and
``ring_degree=2``) with ``enable_lvsa(backend="reference")`` and a sparse pattern; each rank's output must equal
the single-process LVSA output in fp32 (Ulysses x ring on 4 processes: tests/test_diffusers_usp.py).
diffusers 0.42.1's ``_resolve_parallel_config`` computes the device as ``rank % torch.accelerator.device_count()``,
which divides by zero on a machine without an accelerator; the workers patch ``device_count`` to 1 around
``enable_parallelism`` only (the mesh is built on "cpu", and the split/gather hooks and all collectives run
unmodified over gloo).
"""
from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("diffusers")
from diffusers import ContextParallelConfig, WanTransformer3DModel  # noqa: E402
from diffusers.models._modeling_parallel import ContextParallelOutput  # noqa: E402

from gloo_ranks import error, run_ranks  # noqa: E402
from lvsa_kernels import LVSAPattern, SVOOPattern, block_sparse_attn  # noqa: E402
from lvsa_kernels.diffusers import disable_lvsa, enable_lvsa  # noqa: E402
from lvsa_kernels.reference.svoo_profile import SVOOProfile  # noqa: E402
from lvsa_kernels.diffusers.geometry import VideoGeometry  # noqa: E402
from lvsa_kernels.diffusers.parallel import (ContextGroups, RingGroup, UlyssesGroup, context_groups,  # noqa: E402
                                             heads_to_seq, seq_to_heads)
from lvsa_kernels.diffusers.runtime import AttentionRuntime  # noqa: E402

WORLD = 2
T, H_LAT, W_LAT = 8, 8, 8                   # latent; patch (1, 2, 2) -> P = 16, S = 128 tokens
P = (H_LAT // 2) * (W_LAT // 2)
S = T * P
SPARSE = dict(window=1, n_first=1, reference_frames=2, key_frame_interval=4)
TIMESTEPS = (900.0, 800.0)                  # two denoising steps: rotation offsets 0 and 1
TOL = dict(rtol=1e-5, atol=1e-5)


def svoo_pattern() -> SVOOPattern:
    """Sparse SVOO over the two steps (cluster, then reuse) with a different profile floor per head, so a
    rank that used the wrong heads' floors or seeds would differ from the single process."""
    floors = torch.tensor([0.1, 0.3, 0.5, 0.2]).expand(len(TIMESTEPS), 2, 4)
    return SVOOPattern(profile=SVOOProfile(floors), top_p=0.3, q_clusters=4, k_clusters=8, warmup_steps=0,
                       recluster_every=2, clip=(0.0, 1.0))


def tiny_wan(heads: int = 4) -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=16,
                                 in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()


def wan_inputs(frames: int = T, height: int = H_LAT, width: int = W_LAT) -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(2, 4, frames, height, width, generator=g),
                encoder_hidden_states=torch.randn(2, 12, 16, generator=g))


def denoise(model: WanTransformer3DModel, x: dict) -> list:
    """One transformer call per timestep (return_dict=False: diffusers' CP gather hook needs a tensor)."""
    with torch.no_grad():
        return [model(timestep=torch.full((2,), t), return_dict=False, **x)[0] for t in TIMESTEPS]


# ---------------------------------------------------------------------------------------------- workers
def _enable_cp(model: WanTransformer3DModel, cp_plan: dict | None = None, **config) -> None:
    with mock.patch.object(torch.accelerator, "device_count", return_value=1):  # see module docstring
        model.enable_parallelism(config=ContextParallelConfig(**config), cp_plan=cp_plan)


def _record_attn1(model: WanTransformer3DModel, handle, seen: list):
    """Record (tokens the first attn1 receives, geometry the runtime holds) at each call; returns the hook."""
    def hook(module, args):
        seen.append((args[0].shape[1], handle.runtime.geometry))
    return model.blocks[0].attn1.register_forward_pre_hook(hook)


def _worker(rank: int, res: dict) -> None:
    x = wan_inputs()
    # LVSA first, then diffusers' context parallelism; disable_lvsa hands the config to the dense processors
    model = tiny_wan()
    handle = enable_lvsa(model, backend="reference", **SPARSE)
    _enable_cp(model, ulysses_degree=WORLD)
    res["seen"] = []
    recorder = _record_attn1(model, handle, res["seen"])
    res["lvsa_then_cp"] = denoise(model, x)
    recorder.remove()
    res["steps"] = handle.runtime.tracker.step
    disable_lvsa(model)
    res["dense_cp"] = denoise(model, x)
    # context parallelism first, then LVSA
    model = tiny_wan()
    _enable_cp(model, ulysses_degree=WORLD)
    enable_lvsa(model, backend="reference", **SPARSE)
    res["cp_then_lvsa"] = denoise(model, x)
    # ring attention: each rank attends its half against the keys the layout reads on the other rank
    model = tiny_wan()
    _enable_cp(model, ring_degree=WORLD)
    handle = enable_lvsa(model, backend="reference", **SPARSE)
    res["ring"] = denoise(model, x)
    res["ring_traffic"] = handle.runtime.ring_traffic
    # SVOO under Ulysses: each rank clusters its two heads over the full sequence
    model = tiny_wan()
    _enable_cp(model, ulysses_degree=WORLD)
    enable_lvsa(model, pattern=svoo_pattern(), backend="reference")
    res["svoo"] = denoise(model, x)

    # GQA through the runtime's all-to-all: q 4 heads, k/v 2 heads, one random layout
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, S, 4, 16, generator=g)
    k, v = (torch.randn(2, S, 2, 16, generator=g) for _ in range(2))
    ug = UlyssesGroup(dist.group.WORLD, WORLD)
    shard = slice(rank * S // WORLD, (rank + 1) * S // WORLD)
    res["q_heads"], res["k_heads"] = seq_to_heads([q[:, shard], k[:, shard]], ug)
    res["q_back"] = heads_to_seq(res["q_heads"], ug)
    runtime = AttentionRuntime(LVSAPattern(**SPARSE), "reference", "test", "test")
    runtime.begin_forward(VideoGeometry(T, H_LAT // 2, W_LAT // 2), 900.0, ContextGroups(ug, None))
    res["gqa"] = runtime.attend(q[:, shard], k[:, shard], v[:, shard], runtime.layout())

    # bad configurations (each raises on both ranks before any collective)
    odd_heads = tiny_wan(heads=3)
    enable_lvsa(odd_heads, backend="reference", **SPARSE)
    _enable_cp(odd_heads, ulysses_degree=WORLD)
    res["err_heads"] = error(lambda: denoise(odd_heads, x))
    svoo_ring = tiny_wan()
    enable_lvsa(svoo_ring, pattern=svoo_pattern(), backend="reference")
    _enable_cp(svoo_ring, ring_degree=WORLD)
    res["err_svoo_ring"] = error(lambda: denoise(svoo_ring, x))
    unsplit = tiny_wan()  # a plan that gathers the output but never splits the sequence
    enable_lvsa(unsplit, backend="reference", **SPARSE)
    _enable_cp(unsplit, cp_plan={"proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3)},
               ulysses_degree=WORLD)
    res["err_unsplit"] = error(lambda: denoise(unsplit, x))
    odd_tokens = tiny_wan()
    enable_lvsa(odd_tokens, backend="reference", **SPARSE)
    _enable_cp(odd_tokens, ulysses_degree=WORLD)
    res["err_tokens"] = error(lambda: denoise(odd_tokens, wan_inputs(frames=3, height=2, width=2)))


# ---------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("ulysses"))
    return run_ranks(_worker, WORLD, tmp)


@pytest.fixture(scope="module")
def single():
    """The single-process outputs: LVSA with the same pattern, and dense."""
    x = wan_inputs()
    model = tiny_wan()
    dense = denoise(model, x)
    enable_lvsa(model, backend="reference", **SPARSE)
    lvsa = denoise(model, x)
    model = tiny_wan()
    enable_lvsa(model, pattern=svoo_pattern(), backend="reference")
    return {"lvsa": lvsa, "dense": dense, "svoo": denoise(model, x)}


def test_single_process_pattern_is_sparse(single):
    for step in range(len(TIMESTEPS)):
        assert LVSAPattern(**SPARSE).plan(T, P, step=step).density < 0.8
        diff = (single["lvsa"][step] - single["dense"][step]).abs().max()
        assert diff > 1e-2 * single["dense"][step].abs().max()


@pytest.mark.parametrize("order", ["lvsa_then_cp", "cp_then_lvsa"])
def test_ulysses_equals_single_process(ranks, single, order):
    for res in ranks:
        assert len(res[order]) == len(TIMESTEPS)
        for got, want in zip(res[order], single["lvsa"]):
            torch.testing.assert_close(got, want, **TOL)


def test_ring_equals_single_process_and_sends_less(ranks, single):
    for res in ranks:
        for got, want in zip(res["ring"], single["lvsa"]):
            torch.testing.assert_close(got, want, **TOL)
        traffic = res["ring_traffic"]
        assert traffic.calls == 2 * len(TIMESTEPS)  # 2 layers
        assert 0 < traffic.sent_bytes < traffic.dense_bytes


def test_svoo_under_ulysses_equals_single_process(ranks, single):
    for step in range(len(TIMESTEPS)):
        diff = (single["svoo"][step] - single["dense"][step]).abs().max()
        assert diff > 1e-2 * single["dense"][step].abs().max()  # SVOO really is sparse here
    for res in ranks:
        for got, want in zip(res["svoo"], single["svoo"]):
            torch.testing.assert_close(got, want, **TOL)


def test_each_rank_attends_its_shard_with_the_global_geometry(ranks):
    for res in ranks:
        assert res["steps"] == len(TIMESTEPS) - 1
        assert res["seen"] == [(S // WORLD, VideoGeometry(T, H_LAT // 2, W_LAT // 2))] * len(TIMESTEPS)


def test_disable_hands_context_parallelism_to_dense_processors(ranks, single):
    for res in ranks:
        for got, want in zip(res["dense_cp"], single["dense"]):
            torch.testing.assert_close(got, want, **TOL)


def test_all_to_all_and_gqa_attention(ranks):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, S, 4, 16, generator=g)
    k, v = (torch.randn(2, S, 2, 16, generator=g) for _ in range(2))
    want = block_sparse_attn(q, k, v, LVSAPattern(**SPARSE).plan(T, P, step=0), backend="reference")
    for rank, res in enumerate(ranks):
        shard = slice(rank * S // WORLD, (rank + 1) * S // WORLD)
        torch.testing.assert_close(res["q_heads"], q[:, :, 2 * rank:2 * rank + 2], rtol=0, atol=0)
        torch.testing.assert_close(res["k_heads"], k[:, :, rank:rank + 1], rtol=0, atol=0)
        torch.testing.assert_close(res["q_back"], q[:, shard], rtol=0, atol=0)
        torch.testing.assert_close(res["gqa"], want[:, shard], **TOL)


@pytest.mark.parametrize("key, kind, words", [
    ("err_heads", "ValueError", ["3 attention heads", "ulysses_degree=2"]),
    ("err_svoo_ring", "NotImplementedError", ["ring attention", "ring_degree=2", "SVOO", "ulysses_degree=N"]),
    ("err_unsplit", "ValueError", [f"{S} video tokens on rank", f"of 2 (its piece of T*P would be {S // 2})",
                                   f"= {S}"]),
    ("err_tokens", "ValueError", ["3 video tokens are not divisible by ulysses_degree=2"]),
])
def test_bad_configuration_errors(ranks, key, kind, words):
    for res in ranks:
        assert res[key].startswith(kind + ":"), res[key]
        for w in words:
            assert w in res[key], res[key]


class _Mesh:
    def __init__(self, name: str) -> None:
        self.name = name

    def get_group(self):
        return self.name


def _cp(**kw) -> mock.Mock:
    cfg = ContextParallelConfig(**kw)
    cfg._ulysses_mesh, cfg._ring_mesh = _Mesh("ulysses"), _Mesh("ring")
    return mock.Mock(context_parallel_config=cfg)


def test_context_groups_checks_in_process():
    geo = VideoGeometry(T, 4, 4)  # 128 video tokens
    assert context_groups(None, 4, geo, "Wan") is None
    assert context_groups(mock.Mock(context_parallel_config=None), 4, geo, "Wan") is None
    assert context_groups(_cp(ulysses_degree=2), 4, geo, "Wan") == ContextGroups(UlyssesGroup("ulysses", 2), None)
    assert context_groups(_cp(ring_degree=2), 3, geo, "Wan") == ContextGroups(None, RingGroup("ring", 2))
    assert context_groups(_cp(ring_degree=2, ulysses_degree=2), 4, geo, "Wan") == \
        ContextGroups(UlyssesGroup("ulysses", 2), RingGroup("ring", 2))
    assert context_groups(_cp(ring_degree=3, ring_anything=True), 4, geo, "Wan") == \
        ContextGroups(None, RingGroup("ring", 3))
    assert context_groups(_cp(ulysses_degree=2), 4, geo, "Wan", per_call_pattern=True) is not None
    with pytest.raises(NotImplementedError, match="supported for Wan only"):
        context_groups(_cp(ulysses_degree=2), 4, geo, "CogVideoX", supported=False)
    with pytest.raises(NotImplementedError, match="ulysses_anything"):
        context_groups(_cp(ulysses_degree=2, ulysses_anything=True), 4, geo, "Wan")
    with pytest.raises(ValueError, match="4 attention heads are not divisible by ulysses_degree=8"):
        context_groups(_cp(ulysses_degree=8), 4, geo, "Wan")
    with pytest.raises(NotImplementedError, match=r"ring_degree=2\) needs a layout planned from the geometry"):
        context_groups(_cp(ring_degree=2), 4, geo, "Wan", per_call_pattern=True)
    with pytest.raises(ValueError, match=r"128 video tokens are not divisible by ulysses_degree \* ring_degree = "
                                         r"2\*3 = 6; choose"):
        context_groups(_cp(ring_degree=3, ulysses_degree=2), 4, geo, "Wan")
    with pytest.raises(ValueError, match=r"not divisible by ring_degree=3.*ring_anything=True\) for uneven shards"):
        context_groups(_cp(ring_degree=3), 4, geo, "Wan")


def test_context_groups_ranks_follow_diffusers_flattened_mesh():
    ring, ulysses = RingGroup("ring", 3), UlyssesGroup("ulysses", 2)
    with mock.patch.object(dist, "get_rank", lambda group: {"ring": 2, "ulysses": 1}[group]):
        assert ContextGroups(ulysses, ring).rank == 5 and ContextGroups(ulysses, ring).degree == 6
        assert ContextGroups(None, ring).rank == 2 and ContextGroups(ulysses, None).rank == 1
    assert ring.shards(128).bounds == (0, 43, 86, 128)


def test_all_to_all_shape_errors():
    ug = UlyssesGroup(None, 2)
    with pytest.raises(ValueError, match=r"q: dim 2 of \[B, S/N, H, D\] = 3"):
        seq_to_heads([torch.randn(1, 4, 3, 8)], ug, "q")
    with pytest.raises(ValueError, match="out: expected a 4-D tensor"):
        heads_to_seq(torch.randn(4, 3, 8), ug)
