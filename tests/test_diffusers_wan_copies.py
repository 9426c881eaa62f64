"""LVSA on the transformers that carry their own copy of Wan's attention classes (ChronoEdit, Wan 2.2 Animate):
tiny random-weight models on CPU (fp32, reference backend); ``attn1`` only, every other processor kept."""
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import ChronoEditTransformer3DModel, WanAnimateTransformer3DModel  # noqa: E402

from lvsa_kernels.diffusers import enable_lvsa  # noqa: E402

from diffusers_checks import (assert_dense_pattern_matches_original, assert_sparse_differs_and_round_trip,  # noqa: E402
                              assert_svoo_three_way)
from tiny_pipelines import wan_block_config  # noqa: E402

T, HW = 8, 8  # latent [B, C, 8, 8, 8], patch (1, 2, 2): 16 tokens per frame
SPARSE = dict(window=1, n_first=1, reference_frames=2, key_frame_interval=4)


def chronoedit():
    torch.manual_seed(0)
    return ChronoEditTransformer3DModel(**wan_block_config()).eval()


def wan_animate():
    """Wan Animate: in_channels = 2 * latent + 4; a 16 x 16 px face image through a 3-level motion encoder."""
    torch.manual_seed(0)
    config = {**wan_block_config(), "in_channels": 12}
    return WanAnimateTransformer3DModel(
        **config, latent_channels=4, image_dim=None, motion_encoder_channel_sizes={"4": 8, "8": 8, "16": 8},
        motion_encoder_size=16, motion_style_dim=8, motion_dim=4, motion_encoder_dim=8, face_encoder_hidden_dim=16,
        face_encoder_num_heads=2, inject_face_latents_blocks=1, motion_encoder_batch_size=4).eval()


def inputs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = dict(hidden_states=torch.randn(2, model.config.in_channels, T, HW, HW, generator=g),
             encoder_hidden_states=torch.randn(2, 12, 16, generator=g))
    if isinstance(model, WanAnimateTransformer3DModel):  # pose latents for frames 1..T-1, 4 face frames per latent
        x.update(pose_hidden_states=torch.randn(2, 4, T - 1, HW, HW, generator=g),
                 face_pixel_values=torch.randn(2, 3, 4 * (T - 2) + 1, 16, 16, generator=g))
    return x


def run(model, x, t):
    with torch.no_grad():
        return model(timestep=torch.full((2,), float(t)), **x).sample


MODELS = {"chronoedit": chronoedit, "wan_animate": wan_animate}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


def test_dense_pattern_matches_original_processors(model):
    assert_dense_pattern_matches_original(model, inputs(model), run, T)


def test_sparse_differs_attn1_only_and_round_trip(model):
    assert_sparse_differs_and_round_trip(model, inputs(model), run, [b.attn1 for b in model.blocks], **SPARSE)


def test_svoo(model):
    assert_svoo_three_way(model, inputs(model), run)


@pytest.mark.parametrize("name, reference", [("chronoedit", 21), ("wan_animate", 21)])
def test_default_reference_frames(name, reference):
    handle = enable_lvsa(MODELS[name]())
    try:
        assert handle.runtime.pattern.reference_frames == reference
    finally:
        handle.disable()
