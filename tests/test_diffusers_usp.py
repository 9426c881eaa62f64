"""LVSA under diffusers' Ulysses x ring (USP) and ring-only context parallelism: 4 CPU processes (gloo) vs one.

Four ranks (torch.multiprocessing.spawn, gloo, a FileStore in the test's tmp dir) run the tiny random Wan
transformer of tests/test_diffusers_parallel.py under ``ContextParallelConfig(ring_degree=2, ulysses_degree=2)``,
``ring_degree=4`` and ``ring_degree=4, ring_anything=True`` (105 tokens: uneven shards 27, 26, 26, 26) with
``enable_lvsa(backend="reference")``; every rank's output must equal the single-process output in fp32. The
runtime's USP exchange is also run directly with GQA and text before / after the video. diffusers' device count
is patched as in that file; for ``ring_anything`` the workers also replace diffusers' final uneven all_gather
(``_all_gather_anything``: gloo's allgather needs equal sizes, NCCL's does not) by a padded one.
"""
from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("diffusers")
from gloo_ranks import error, run_ranks  # noqa: E402
from test_diffusers_parallel import SPARSE, TIMESTEPS, TOL, _enable_cp, denoise, tiny_wan, wan_inputs  # noqa: E402

from lvsa_kernels import LVSAPattern, block_sparse_attn  # noqa: E402
from lvsa_kernels.diffusers import enable_lvsa  # noqa: E402
from lvsa_kernels.diffusers.geometry import VideoGeometry  # noqa: E402
from lvsa_kernels.diffusers.parallel import ContextGroups, RingGroup, UlyssesGroup  # noqa: E402
from lvsa_kernels.diffusers.runtime import AttentionRuntime  # noqa: E402

WORLD = 4
UNEVEN = dict(frames=7, height=6, width=10)   # T = 7, P = 3 x 5 = 15: 105 tokens over 4 ranks
GEO = VideoGeometry(8, 4, 4)                  # the default wan_inputs(): 128 video tokens
TEXT = 4                                      # 132 tokens with text: 33 per rank


def _attend_inputs():
    g = torch.Generator().manual_seed(7)
    s = GEO.video_tokens + TEXT
    q = torch.randn(2, s, 4, 16, generator=g)
    k, v = (torch.randn(2, s, 2, 16, generator=g) for _ in range(2))
    return q, k, v


def _gather_padded(tensor: torch.Tensor, dim: int, group) -> torch.Tensor:
    """diffusers' ``_all_gather_anything`` for gloo: pad every piece to the largest, gather, trim, concatenate."""
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([tensor.shape[dim]]), group=group)
    longest = max(int(n) for n in sizes)
    pad = torch.zeros_like(tensor.narrow(dim, 0, 1)).expand(
        *[longest - tensor.shape[dim] if d == dim else -1 for d in range(tensor.dim())])
    pieces = [torch.empty_like(torch.cat([tensor, pad], dim)) for _ in sizes]
    dist.all_gather(pieces, torch.cat([tensor, pad], dim).contiguous(), group=group)
    return torch.cat([p.narrow(dim, 0, int(n)) for p, n in zip(pieces, sizes)], dim)


def _worker(rank: int, res: dict) -> None:
    x = wan_inputs()
    for name, config in (("usp", dict(ring_degree=2, ulysses_degree=2)), ("ring4", dict(ring_degree=4))):
        model = tiny_wan()
        _enable_cp(model, **config)
        handle = enable_lvsa(model, backend="reference", **SPARSE)
        res[name] = denoise(model, x)
        res[name + "/traffic"] = handle.runtime.ring_traffic
    model = tiny_wan()
    _enable_cp(model, ring_degree=4, ring_anything=True)
    enable_lvsa(model, backend="reference", **SPARSE)
    with mock.patch("diffusers.hooks.context_parallel._all_gather_anything", _gather_padded):
        res["ring_anything"] = denoise(model, wan_inputs(**UNEVEN))

    # the runtime's USP exchange on diffusers' mesh layout: ulysses groups {0,1} {2,3}, ring groups {0,2} {1,3}
    ulysses = [dist.new_group([0, 1]), dist.new_group([2, 3])][rank // 2]
    ring = [dist.new_group([0, 2]), dist.new_group([1, 3])][rank % 2]
    q, k, v = _attend_inputs()
    piece = slice(rank * q.shape[1] // WORLD, (rank + 1) * q.shape[1] // WORLD)
    runtime = AttentionRuntime(LVSAPattern(**SPARSE), "reference", "test", "test")
    runtime.begin_forward(GEO, 900.0, ContextGroups(UlyssesGroup(ulysses, 2), RingGroup(ring, 2)))
    for where in ("before", "after"):
        res["gqa_" + where] = runtime.attend(q[:, piece], k[:, piece], v[:, piece],
                                             runtime.layout(TEXT, where))

    odd = tiny_wan()
    _enable_cp(odd, ring_degree=2, ulysses_degree=2)
    enable_lvsa(odd, backend="reference", **SPARSE)
    res["err_tokens"] = error(lambda: denoise(odd, wan_inputs(frames=3, height=2, width=2)))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("usp"))
    return run_ranks(_worker, WORLD, tmp)


@pytest.fixture(scope="module")
def single():
    out = {}
    for name, x in (("even", wan_inputs()), ("uneven", wan_inputs(**UNEVEN))):
        model = tiny_wan()
        enable_lvsa(model, backend="reference", **SPARSE)
        out[name] = denoise(model, x)
    return out


@pytest.mark.parametrize("name, inputs", [("usp", "even"), ("ring4", "even"), ("ring_anything", "uneven")])
def test_context_parallel_equals_single_process(ranks, single, name, inputs):
    for res in ranks:
        assert len(res[name]) == len(TIMESTEPS)
        for got, want in zip(res[name], single[inputs]):
            torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("name", ["usp", "ring4"])
def test_ring_traffic_below_a_dense_ring(ranks, name):
    for res in ranks:
        traffic = res[name + "/traffic"]
        assert traffic.calls == 2 * len(TIMESTEPS)
        assert 0 < traffic.sent_bytes < traffic.dense_bytes


@pytest.mark.parametrize("where", ["before", "after"])
def test_usp_exchange_with_gqa_and_text(ranks, where):
    q, k, v = _attend_inputs()
    layout = LVSAPattern(**SPARSE).plan(GEO.frames, GEO.tokens_per_frame, step=0, text_tokens=TEXT,
                                        text_position=where)
    want = block_sparse_attn(q, k, v, layout, backend="reference")
    for rank, res in enumerate(ranks):
        piece = slice(rank * q.shape[1] // WORLD, (rank + 1) * q.shape[1] // WORLD)
        torch.testing.assert_close(res["gqa_" + where], want[:, piece], **TOL)


def test_usp_token_error(ranks):
    for res in ranks:
        assert res["err_tokens"].startswith("ValueError:"), res["err_tokens"]
        assert "3 video tokens are not divisible by ulysses_degree * ring_degree = 2*2 = 4" in res["err_tokens"]
