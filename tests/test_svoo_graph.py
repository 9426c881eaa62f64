"""CUDA graphs of SVOO reuse calls (`SVOOPattern.attention(cuda_graph=True)`) against the eager calls.

The GPU tests are skipped without CUDA; on CPU the option must fall back to the eager call with one warning.
"""
import logging

import pytest
import torch

from lvsa_kernels import SVOOPattern
from lvsa_kernels.reference.svoo_profile import SVOOProfile

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")


def pattern(steps=6, heads=2, layers=2):
    g = torch.Generator().manual_seed(1)
    keep = 0.1 + 0.3 * torch.rand(steps, layers, heads, generator=g)  # floors change from step to step
    return SVOOPattern(profile=SVOOProfile(keep), top_p=0.7, q_clusters=8, k_clusters=24, warmup_steps=1,
                       recluster_every=3, clip=(0.0, 1.0))


def inputs(step, device, dtype, B=1, S=384, H=2, D=64):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(B, S, H, D, generator=g).to(device, dtype) for _ in range(3)]


@gpu
@pytest.mark.parametrize("text_tokens", [0, 32])
def test_graphed_reuse_calls_equal_eager_calls(text_tokens):
    """Steps 0..5: dense, re-cluster, reuse, reuse, re-cluster, reuse; two layers, two CFG branches. The
    graphed pattern gives bit-identical outputs and captures once per (layer, branch, clustering)."""
    graphed, eager = pattern(), pattern()
    for step in range(6):
        for layer in (0, 1):
            for branch in ("cond", "uncond"):
                q, k, v = inputs(10 * step + 2 * layer + (branch == "cond"), "cuda", torch.bfloat16)
                want = eager.attention(q, k, v, step, layer, backend="triton", branch=branch, text_tokens=text_tokens)
                got = graphed.attention(q, k, v, step, layer, backend="triton", branch=branch,
                                        text_tokens=text_tokens, cuda_graph=True)
                assert torch.equal(got, want), (step, layer, branch)
                if step >= graphed.warmup_steps:  # warm-up steps run dense and cache nothing
                    assert graphed._cache[(layer, branch)].step == step
    assert len(graphed.graphs._graphs) == 4  # the step-5 graphs replaced the step-2 ones


@gpu
def test_reuse_call_never_synchronises():
    """The eager reuse call has no host synchronisation (what makes it capturable)."""
    pat = pattern()
    q, k, v = inputs(0, "cuda", torch.bfloat16)
    pat.attention(q, k, v, 1, 0, backend="triton")
    pat.attention(q, k, v, 2, 0, backend="triton")  # warm: compiles, floors table
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pat.attention(q, k, v, 2, 0, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_graph_without_cuda_runs_eagerly_with_one_warning(caplog):
    device = "cuda" if CUDA else "cpu"
    dtype = torch.float32
    pat, ref = pattern(), pattern()
    q, k, v = inputs(0, device, dtype, S=96, D=32)
    with caplog.at_level(logging.WARNING, logger="lvsa_kernels"):
        for step in (1, 2, 3):
            got = pat.attention(q, k, v, step, 0, backend="reference", cuda_graph=True)
            assert torch.equal(got, ref.attention(q, k, v, step, 0, backend="reference"))
    warnings = [r for r in caplog.records if "cuda_graph=True runs eagerly" in r.getMessage()]
    reason = "backend='reference'" if CUDA else "q is on cpu, CUDA graphs need a CUDA device"
    assert len(warnings) == 1 and reason in warnings[0].getMessage()
    assert not pat.graphs._graphs
