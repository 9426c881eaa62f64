"""LVSA on tiny random-weight CosmosTransformer3DModel and AllegroTransformer3DModel (video-only attn1, text in
attn2; CPU, fp32, reference backend)."""
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import AllegroTransformer3DModel, CosmosTransformer3DModel  # noqa: E402
from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro  # noqa: E402

from lvsa_kernels.diffusers import enable_lvsa  # noqa: E402

from diffusers_checks import (assert_dense_pattern_matches_original, assert_sparse_differs_and_round_trip,  # noqa: E402
                              assert_svoo_three_way)

T, HW = 8, 8  # latent [B, 4, 8, 8, 8], patch 2: 16 tokens per frame
SPARSE = dict(window=1, n_first=1, reference_frames=2, key_frame_interval=4)


def cosmos():
    """No padding-mask channel (diffusers resizes that mask with torchvision, not a test dependency)."""
    torch.manual_seed(0)
    return CosmosTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12,
                                    num_layers=2, mlp_ratio=2, text_embed_dim=16, adaln_lora_dim=4,
                                    max_size=(T, 32, 32), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
                                    concat_padding_mask=False, extra_pos_embed_type="learnable").eval()


def allegro():
    torch.manual_seed(0)
    return AllegroTransformer3DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                                     num_layers=2, cross_attention_dim=24, sample_width=HW, sample_height=HW,
                                     sample_frames=T, caption_channels=8).eval()


def allegro_rope():
    """The `AllegroPipeline`'s RoPE tables and positions for a T x 4 x 4 token grid."""
    *freqs, grid_t, grid_h, grid_w = get_3d_rotary_pos_embed_allegro(
        embed_dim=12, crops_coords=((0, 0), (HW // 2, HW // 2)), grid_size=(HW // 2, HW // 2), temporal_size=T,
        interpolation_scale=(2.2, 2.0, 2.0))
    pos = torch.cartesian_prod(grid_t.long(), grid_h.long(), grid_w.long()).reshape(-1, 3).T.reshape(3, 1, -1)
    return freqs, pos


def inputs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = dict(hidden_states=torch.randn(2, 4, T, HW, HW, generator=g))
    if isinstance(model, CosmosTransformer3DModel):
        x.update(encoder_hidden_states=torch.randn(2, 12, 16, generator=g), fps=30)
    else:
        x.update(encoder_hidden_states=torch.randn(2, 6, 8, generator=g), image_rotary_emb=allegro_rope())
    return x


def run(model, x, t):
    with torch.no_grad():
        return model(timestep=torch.full((2,), float(t)), **x).sample


MODELS = {"cosmos": cosmos, "allegro": allegro}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


def test_dense_pattern_matches_original_processors(model):
    assert_dense_pattern_matches_original(model, inputs(model), run, T)


def test_sparse_differs_attn1_only_and_round_trip(model):
    replaced = [b.attn1 for b in model.transformer_blocks]
    assert_sparse_differs_and_round_trip(model, inputs(model), run, replaced, **SPARSE)


def test_svoo(model):
    assert_svoo_three_way(model, inputs(model), run)


@pytest.mark.parametrize("name, reference, source", [("cosmos", 16, "Cosmos 1.0 default (121 frames, 8x temporal)"),
                                                     ("allegro", T, "config sample_frames")])
def test_default_reference_frames(name, reference, source):
    handle = enable_lvsa(MODELS[name]())
    try:
        assert (handle.runtime.pattern.reference_frames, handle.runtime.reference_source) == (reference, source)
    finally:
        handle.disable()
