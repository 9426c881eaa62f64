"""Tiny random-weight Wan models and inputs shared by the diffusers tests (no downloads).

Config from the diffusers test suite: 2 heads x 12, 2 layers, patch (1, 2, 2); an 8 x 8 latent frame is
16 tokens. Import only after ``pytest.importorskip("diffusers")``.
"""
from typing import Any, Callable

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel


def tiny_transformer(seed: int) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                 out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()


def tiny_pipeline(two_experts: bool = False) -> WanPipeline:
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=vae.eval(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=tiny_transformer(1), transformer_2=tiny_transformer(2) if two_experts else None,
                       boundary_ratio=0.5 if two_experts else None)


T, H_LAT, W_LAT = 8, 8, 8  # latent frames and size of the shared test inputs; patch (1, 2, 2) -> 16 tokens per frame


def inputs(batch: int = 2, seed: int = 1) -> dict:
    """`wan_inputs` at the shared test size ``T x H_LAT x W_LAT`` (S = 128 tokens)."""
    return wan_inputs(T, H_LAT, W_LAT, batch, seed)


def wan_inputs(frames: int, height: int, width: int, batch: int = 2, seed: int = 1) -> dict:
    """Random latents ``[B, 4, frames, height, width]`` and text embeddings ``[B, 12, 16]``."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, frames, height, width, generator=g),
                encoder_hidden_states=torch.randn(batch, 12, 16, generator=g))


def run(model, x: dict, t: float) -> torch.Tensor:
    """One forward at timestep ``t`` for every batch element."""
    with torch.no_grad():
        return model(timestep=torch.full((x["hidden_states"].shape[0],), float(t)), **x).sample


def assert_round_trip(model: WanTransformer3DModel, enable: Callable[[], Any]) -> None:
    """``enable()`` (an `enable_lvsa` / `enable_svoo` call returning the handle) replaces every attn1 processor
    and changes the output; `disable_lvsa` restores the processor objects, removes the hooks and gives back
    exactly the original output."""
    from lvsa_kernels.diffusers import disable_lvsa

    x = inputs()
    before = run(model, x, 500)
    procs = [(b.attn1.processor, b.attn2.processor) for b in model.blocks]
    handle = enable()
    assert handle.active
    assert all(b.attn1.processor is not p1 and b.attn2.processor is p2 for b, (p1, p2) in zip(model.blocks, procs))
    sparse = run(model, x, 500)
    disable_lvsa(model)
    assert not handle.active
    assert all(b.attn1.processor is p1 and b.attn2.processor is p2 for b, (p1, p2) in zip(model.blocks, procs))
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert torch.equal(run(model, x, 500), before)
    assert not torch.allclose(sparse, before, atol=1e-4)  # the sparse attention really changed the result
