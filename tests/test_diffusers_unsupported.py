"""Transformers enable_lvsa recognises but does not run get a NotImplementedError saying why, and nothing is
installed on them."""
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import (Cosmos3OmniTransformer, HunyuanVideoFramepackTransformer3DModel,  # noqa: E402
                       LatteTransformer3DModel, SanaVideoTransformer3DModel, WanAnimate2Transformer3DModel)

from lvsa_kernels.diffusers import enable_lvsa, enable_svoo  # noqa: E402


def cosmos3():
    return Cosmos3OmniTransformer(head_dim=8, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                  num_hidden_layers=1, num_key_value_heads=1, vocab_size=32, latent_channel=4,
                                  patch_latent_dim=16)


def latte():
    return LatteTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                   num_layers=1, sample_size=8, patch_size=2, cross_attention_dim=16,
                                   caption_channels=16, num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                                   video_length=2)


def sana_video():
    return SanaVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                       num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                       cross_attention_dim=16, caption_channels=16, sample_size=8, patch_size=(1, 2, 2))


def framepack():
    return HunyuanVideoFramepackTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                   attention_head_dim=8, num_layers=1, num_single_layers=1,
                                                   num_refiner_layers=1, patch_size=2, patch_size_t=1,
                                                   text_embed_dim=16, pooled_projection_dim=8,
                                                   rope_axes_dim=(2, 2, 4), image_proj_dim=16)


def wan_animate2():
    return WanAnimate2Transformer3DModel(in_dim=4, dim=16, ffn_dim=32, freq_dim=16, text_dim=16, out_dim=4,
                                         num_heads=2, num_layers=1)


REFUSED = [(cosmos3, "Cosmos3OmniTransformer", "rectangular"),
           (latte, "LatteTransformer3DModel", "spatial self-attention within each frame and temporal"),
           (sana_video, "SanaVideoTransformer3DModel", "linear attention"),
           (framepack, "HunyuanVideoFramepackTransformer3DModel", "no uniform frame grid"),
           (wan_animate2, "WanAnimate2Transformer3DModel", "already structured sparse attention")]


@pytest.mark.parametrize("build, name, reason", REFUSED, ids=[n for _, n, _ in REFUSED])
def test_refused_with_the_reason(build, name, reason):
    torch.manual_seed(0)
    model = build()
    for enable in (enable_lvsa, enable_svoo):
        with pytest.raises(NotImplementedError, match=rf"LVSA \({name}\): not supported: .*{reason}"):
            enable(model)
    assert "_lvsa_handle" not in model.__dict__ and not model._forward_pre_hooks
