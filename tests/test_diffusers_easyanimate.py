"""LVSA on a tiny random-weight EasyAnimateTransformer3DModel: joint attention over [text; video], text first;
one MMDiT block (separate text projections) and one shared-projection block (CPU, fp32, reference backend)."""
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import EasyAnimateTransformer3DModel  # noqa: E402

from diffusers_checks import (assert_dense_pattern_matches_original,  # noqa: E402
                              assert_joint_layers_match_masked_original, assert_sparse_differs_and_round_trip)

T, HW, TEXT = 8, 8, 6  # latent [B, 4, 8, 8, 8], patch 2: P = 16 tokens per frame
P = (HW // 2) ** 2
SPARSE = dict(window=1, n_first=1, reference_frames=2, key_frame_interval=4)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return EasyAnimateTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                         patch_size=2, sample_width=HW, sample_height=HW, num_layers=2,
                                         mmdit_layers=1, time_embed_dim=8, text_embed_dim=16).eval()


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 4, T, HW, HW, generator=g),
                encoder_hidden_states=torch.randn(2, TEXT, 16, generator=g))


def run(model, x, t):
    with torch.no_grad():
        return model(timestep=torch.full((2,), float(t)), **x).sample


def test_blocks_cover_both_projection_kinds(model):
    assert [b.attn1.add_q_proj is not None for b in model.transformer_blocks] == [True, False]


def test_dense_pattern_matches_original_processors(model):
    assert_dense_pattern_matches_original(model, inputs(), run, T)


def test_sparse_layers_match_masked_original(model):
    """Each attn1 call equals the original processor given the planned layout (text first) as a boolean mask."""
    attn1 = [b.attn1 for b in model.transformer_blocks]
    assert_joint_layers_match_masked_original(model, attn1, run, inputs(), T, P, TEXT, **SPARSE)


def test_sparse_differs_attn1_only_and_round_trip(model):
    assert_sparse_differs_and_round_trip(model, inputs(), run, [b.attn1 for b in model.transformer_blocks], **SPARSE)
