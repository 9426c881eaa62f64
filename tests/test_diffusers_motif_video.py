"""LVSA and SVOO on a tiny random-weight MotifVideoTransformer3DModel: joint attention over [video; padded text]
in 1 dual-stream and 1 encoder single-stream block; the 1 decoder single-stream block ([video; video]) and the text
cross-attentions keep their processors (CPU, fp32, reference backend)."""
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import MotifVideoTransformer3DModel  # noqa: E402

from lvsa_kernels.diffusers import enable_lvsa  # noqa: E402

from diffusers_checks import (assert_dense_pattern_matches_original, assert_sparse_differs_and_round_trip,  # noqa: E402
                              assert_svoo_three_way)

T, HW, TEXT = 8, 8, 6  # latent [B, 4, 8, 8, 8], patch 2: 16 tokens per frame
SPARSE = dict(window=1, n_first=1, reference_frames=2, key_frame_interval=4)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MotifVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                        num_layers=1, num_single_layers=2, num_decoder_layers=1, mlp_ratio=2.0,
                                        text_embed_dim=16, rope_axes_dim=(2, 2, 4),
                                        enable_text_cross_attention_single=True).eval()


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, TEXT, dtype=torch.long)
    mask[1, TEXT - 2:] = 0
    return dict(hidden_states=torch.randn(2, 4, T, HW, HW, generator=g),
                encoder_hidden_states=torch.randn(2, TEXT, 16, generator=g), encoder_attention_mask=mask)


def run(model, x, t):
    with torch.no_grad():
        return model(timestep=torch.full((2,), float(t)), **x).sample


def replaced(model):
    return [model.transformer_blocks[0].attn, model.single_transformer_blocks[0].attn]


def test_dense_pattern_matches_original_processors(model):
    assert_dense_pattern_matches_original(model, inputs(), run, T)


def test_sparse_differs_encoder_attention_only_and_round_trip(model):
    assert model.single_transformer_blocks[0].cross_attn is not None  # a text cross-attention that stays
    assert_sparse_differs_and_round_trip(model, inputs(), run, replaced(model), **SPARSE)


def test_svoo(model):
    assert_svoo_three_way(model, inputs(), run)


def test_default_reference_frames(model):
    handle = enable_lvsa(model)
    try:
        assert handle.runtime.pattern.reference_frames == 31
    finally:
        handle.disable()
