"""LVSA on a tiny random-weight ConsisIDTransformer3DModel (CogVideoX's joint attn1, text first; CPU, fp32)."""
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import ConsisIDTransformer3DModel  # noqa: E402
from diffusers.models.embeddings import get_3d_rotary_pos_embed  # noqa: E402

from lvsa_kernels.diffusers import enable_lvsa  # noqa: E402

from diffusers_checks import assert_dense_pattern_matches_original, assert_sparse_differs_and_round_trip  # noqa: E402

T, HW, HEAD_DIM, TEXT = 8, 8, 16, 8    # latent [B, T, C, 8, 8], patch 2 -> 16 tokens per frame
SPARSE = dict(window=1, n_first=1, reference_frames=2, key_frame_interval=4)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ConsisIDTransformer3DModel(num_attention_heads=2, attention_head_dim=HEAD_DIM, in_channels=4,
                                      out_channels=4, time_embed_dim=4, text_embed_dim=8, num_layers=2,
                                      sample_width=HW, sample_height=HW, sample_frames=49, patch_size=2,
                                      max_text_seq_length=TEXT, use_rotary_positional_embeddings=True).eval()


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    rope = get_3d_rotary_pos_embed(embed_dim=HEAD_DIM, crops_coords=((0, 0), (HW // 2, HW // 2)),
                                   grid_size=(HW // 2, HW // 2), temporal_size=T)
    return dict(hidden_states=torch.randn(2, T, 4, HW, HW, generator=g),
                encoder_hidden_states=torch.randn(2, TEXT, 8, generator=g), image_rotary_emb=rope)


def run(model, x, t):
    with torch.no_grad():
        return model(timestep=torch.full((2,), float(t)), **x).sample


def test_dense_pattern_matches_original_processors(model):
    assert_dense_pattern_matches_original(model, inputs(), run, T)


def test_sparse_differs_attn1_only_and_round_trip(model):
    assert_sparse_differs_and_round_trip(model, inputs(), run, [b.attn1 for b in model.transformer_blocks], **SPARSE)


def test_reference_frames_from_config(model):
    handle = enable_lvsa(model)
    try:
        assert (handle.runtime.pattern.reference_frames, handle.runtime.reference_source) == (13, "config sample_frames")
    finally:
        handle.disable()
