"""LVSA and SVOO on a tiny random-weight MochiTransformer3DModel: joint attention over [video; padded text]
(CPU, fp32, reference backend); batch element 1 has 3 padded text tokens."""
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import MochiTransformer3DModel  # noqa: E402

from lvsa_kernels.diffusers import disable_lvsa, enable_lvsa  # noqa: E402

from diffusers_checks import (assert_dense_pattern_matches_original, assert_sparse_differs_and_round_trip,  # noqa: E402
                              assert_svoo_three_way)

T, HW, TEXT = 8, 8, 8  # latent [B, 4, 8, 8, 8], patch 2: 16 tokens per frame
SPARSE = dict(window=1, n_first=1, reference_frames=2, key_frame_interval=4)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                   pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=4,
                                   max_sequence_length=TEXT).eval()


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, TEXT, dtype=torch.long)
    mask[1, TEXT - 3:] = 0
    return dict(hidden_states=torch.randn(2, 4, T, HW, HW, generator=g),
                encoder_hidden_states=torch.randn(2, TEXT, 16, generator=g), encoder_attention_mask=mask)


def run(model, x, t):
    with torch.no_grad():
        return model(timestep=torch.full((2,), float(t)), **x).sample


def test_dense_pattern_matches_original_processors(model):
    assert_dense_pattern_matches_original(model, inputs(), run, T)


def test_sparse_differs_attn1_only_and_round_trip(model):
    assert_sparse_differs_and_round_trip(model, inputs(), run, [b.attn1 for b in model.transformer_blocks], **SPARSE)


def test_svoo(model):
    assert_svoo_three_way(model, inputs(), run)


def test_suffix_padded_text_mask_is_refused(model):
    x = inputs()
    x["encoder_attention_mask"][0, 0] = 0  # a padded token before valid ones
    enable_lvsa(model, backend="reference")
    try:
        with pytest.raises(ValueError, match="valid text tokens first"):
            run(model, x, 500)
    finally:
        disable_lvsa(model)


def test_default_reference_frames(model):
    handle = enable_lvsa(model)
    try:
        assert handle.runtime.pattern.reference_frames == 28
    finally:
        handle.disable()
