"""Tiny random-weight Wan models and inputs shared by the diffusers tests (no downloads).

Config from the diffusers test suite: 2 heads x 12, 2 layers, patch (1, 2, 2); an 8 x 8 latent frame is
16 tokens. Import only after ``pytest.importorskip("diffusers")``.
"""
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


def wan_inputs(frames: int, height: int, width: int, batch: int = 2, seed: int = 1) -> dict:
    """Random latents ``[B, 4, frames, height, width]`` and text embeddings ``[B, 12, 16]``."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, frames, height, width, generator=g),
                encoder_hidden_states=torch.randn(batch, 12, 16, generator=g))


def run(model, x: dict, t: float) -> torch.Tensor:
    """One forward at timestep ``t`` for every batch element."""
    with torch.no_grad():
        return model(timestep=torch.full((x["hidden_states"].shape[0],), float(t)), **x).sample
