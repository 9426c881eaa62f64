"""Random attention inputs shared by the CPU backend tests (fresh ``torch.randn``, never zeros)."""
import torch


def random_qkv(B, Sq, Skv, H, Hkv, D, seed, dtype=torch.float32):
    """q ``[B, Sq, H, D]``, k and v ``[B, Skv, Hkv, D]`` from one seeded CPU generator (float32, then cast)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, s, h, D, generator=g).to(dtype) for s, h in ((Sq, H), (Skv, Hkv), (Skv, Hkv)))
