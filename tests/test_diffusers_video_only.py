"""LVSA and SVOO on tiny random-weight transformers whose self-attention is video-only (text in a separate
cross-attention): ChronoEdit and Wan 2.2 Animate (their own copies of Wan's attention), Cosmos and Allegro.
CPU, fp32, reference backend; only the self-attention is replaced, every other processor kept."""
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import (AllegroTransformer3DModel, ChronoEditTransformer3DModel,  # noqa: E402
                       CosmosTransformer3DModel, WanAnimateTransformer3DModel)
from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro  # noqa: E402

from lvsa_kernels.diffusers import enable_lvsa  # noqa: E402
from lvsa_kernels.diffusers.tiny_pipeline import wan_block_config  # noqa: E402

from diffusers_checks import (assert_dense_pattern_matches_original, assert_sparse_differs_and_round_trip,  # noqa: E402
                              assert_svoo_three_way)

T, HW = 8, 8  # latent [B, C, 8, 8, 8], patch (1, 2, 2): 16 tokens per frame
SPARSE = dict(window=1, n_first=1, reference_frames=2, key_frame_interval=4)


def chronoedit():
    return ChronoEditTransformer3DModel(**wan_block_config())


def wan_animate():
    """Wan Animate: in_channels = 2 * latent + 4; a 16 x 16 px face image through a 3-level motion encoder."""
    return WanAnimateTransformer3DModel(
        **{**wan_block_config(), "in_channels": 12}, latent_channels=4, image_dim=None,
        motion_encoder_channel_sizes={"4": 8, "8": 8, "16": 8}, motion_encoder_size=16, motion_style_dim=8,
        motion_dim=4, motion_encoder_dim=8, face_encoder_hidden_dim=16, face_encoder_num_heads=2,
        inject_face_latents_blocks=1, motion_encoder_batch_size=4)


def cosmos():
    """No padding-mask channel (diffusers resizes that mask with torchvision, not a test dependency)."""
    return CosmosTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12,
                                    num_layers=2, mlp_ratio=2, text_embed_dim=16, adaln_lora_dim=4,
                                    max_size=(T, 32, 32), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
                                    concat_padding_mask=False, extra_pos_embed_type="learnable")


def allegro():
    return AllegroTransformer3DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                                     num_layers=2, cross_attention_dim=24, sample_width=HW, sample_height=HW,
                                     sample_frames=T, caption_channels=8)


BUILD = {"chronoedit": chronoedit, "wan_animate": wan_animate, "cosmos": cosmos, "allegro": allegro}


def build(name):
    torch.manual_seed(0)
    return BUILD[name]().eval()


def allegro_rope():
    """The `AllegroPipeline`'s RoPE tables and positions for a T x 4 x 4 token grid."""
    *freqs, grid_t, grid_h, grid_w = get_3d_rotary_pos_embed_allegro(
        embed_dim=12, crops_coords=((0, 0), (HW // 2, HW // 2)), grid_size=(HW // 2, HW // 2), temporal_size=T,
        interpolation_scale=(2.2, 2.0, 2.0))
    pos = torch.cartesian_prod(grid_t.long(), grid_h.long(), grid_w.long()).reshape(-1, 3).T.reshape(3, 1, -1)
    return freqs, pos


def inputs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = dict(hidden_states=torch.randn(2, model.config.in_channels, T, HW, HW, generator=g))
    if isinstance(model, AllegroTransformer3DModel):
        x.update(encoder_hidden_states=torch.randn(2, 6, 8, generator=g), image_rotary_emb=allegro_rope())
    else:
        x.update(encoder_hidden_states=torch.randn(2, 12, 16, generator=g))
    if isinstance(model, CosmosTransformer3DModel):
        x.update(fps=30)
    if isinstance(model, WanAnimateTransformer3DModel):  # pose latents for frames 1..T-1, 4 face frames per latent
        x.update(pose_hidden_states=torch.randn(2, 4, T - 1, HW, HW, generator=g),
                 face_pixel_values=torch.randn(2, 3, 4 * (T - 2) + 1, 16, 16, generator=g))
    return x


def run(model, x, t):
    with torch.no_grad():
        return model(timestep=torch.full((2,), float(t)), **x).sample


def self_attention(model):
    return [b.attn1 for b in getattr(model, "blocks", None) or model.transformer_blocks]


@pytest.fixture(scope="module", params=sorted(BUILD))
def model(request):
    return build(request.param)


def test_dense_pattern_matches_original_processors(model):
    assert_dense_pattern_matches_original(model, inputs(model), run, T)


def test_sparse_differs_self_attention_only_and_round_trip(model):
    assert_sparse_differs_and_round_trip(model, inputs(model), run, self_attention(model), **SPARSE)


def test_svoo(model):
    assert_svoo_three_way(model, inputs(model), run)


@pytest.mark.parametrize("name, reference, source", [
    ("chronoedit", 21, "ChronoEdit default (81 frames)"),
    ("wan_animate", 21, "Wan Animate default (77-frame segment + reference frame)"),
    ("cosmos", 16, "Cosmos 1.0 default (121 frames, 8x temporal)"),
    ("allegro", T, "config sample_frames")])
def test_default_reference_frames(name, reference, source):
    handle = enable_lvsa(build(name))
    try:
        assert (handle.runtime.pattern.reference_frames, handle.runtime.reference_source) == (reference, source)
    finally:
        handle.disable()
