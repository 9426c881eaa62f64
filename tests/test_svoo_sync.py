"""An SVOO reuse-step call (cached clusters) never waits for the GPU (CUDA only; the CPU op count is in
test_svoo_op_count.py)."""
import pytest
import torch

from lvsa_kernels import SVOOPattern
from lvsa_kernels.reference.svoo_profile import SVOOProfile


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA synchronisation check")
def test_reuse_call_never_synchronises():
    keep = 0.1 + 0.3 * torch.rand(6, 2, 2, generator=torch.Generator().manual_seed(1))  # floors vary per step
    pat = SVOOPattern(profile=SVOOProfile(keep), top_p=0.7, q_clusters=8, k_clusters=24, warmup_steps=1,
                      recluster_every=3, clip=(0.0, 1.0))
    g = torch.Generator().manual_seed(100)
    q, k, v = (torch.randn(1, 384, 2, 64, generator=g).to("cuda", torch.bfloat16) for _ in range(3))
    pat.attention(q, k, v, 1, 0, backend="triton")  # clusters
    pat.attention(q, k, v, 2, 0, backend="triton")  # warm reuse: compiles, floors table
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pat.attention(q, k, v, 2, 0, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
