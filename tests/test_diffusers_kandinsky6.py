"""LVSA and SVOO on a tiny random-weight Kandinsky6Transformer3DModel (video + audio): the video self-attention
only; audio self-attention and every cross-attention keep their processors (CPU, fp32, reference backend)."""
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import Kandinsky6Transformer3DModel  # noqa: E402

from lvsa_kernels.diffusers import disable_lvsa, enable_lvsa  # noqa: E402

from diffusers_checks import (assert_dense_pattern_matches_original, assert_sparse_differs_and_round_trip,  # noqa: E402
                              assert_svoo_three_way)

T, HW, TEXT = 8, 8, 5  # latent [B, 8, 8, 8, 4], patch (1, 2, 2): 16 tokens per frame
SPARSE = dict(window=1, n_first=1, reference_frames=2, key_frame_interval=4)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Kandinsky6Transformer3DModel(in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=8,
                                        model_dim=32, ff_dim=32, num_text_blocks=1, num_visual_blocks=2,
                                        axes_dims=(4, 6, 6), visual_cond=False, in_audio_dim=4,
                                        out_audio_dim=4).eval()


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, T, HW, HW, 4, generator=g),
                encoder_hidden_states=torch.randn(2, TEXT, 16, generator=g),
                pooled_projections=torch.randn(2, 8, generator=g),
                audio_hidden_states=torch.randn(2, 6, 4, generator=g))


def run(model, x, t):
    with torch.no_grad():
        out = model(timestep=torch.full((2,), float(t)), **x)
    return torch.cat([out.sample.flatten(1), out.audio_sample.flatten(1)], dim=1)


def test_dense_pattern_matches_original_processors(model):
    assert_dense_pattern_matches_original(model, inputs(), run, T)


def test_sparse_differs_video_self_attention_only_and_round_trip(model):
    replaced = [b.video_dec_block.self_attention for b in model.visual_transformer_blocks]
    assert_sparse_differs_and_round_trip(model, inputs(), run, replaced, **SPARSE)


def test_svoo(model):
    assert_svoo_three_way(model, inputs(), run)


def test_image_conditioned_call_is_refused(model):
    """The TI2VA pipeline's reference frame: appended last, temporal RoPE position 0."""
    x = inputs()
    x["hidden_states"] = torch.randn(2, T + 1, HW, HW, 4)
    x["visual_rope_pos"] = (torch.cat([torch.arange(T), torch.zeros(1, dtype=torch.long)]), torch.arange(HW // 2),
                            torch.arange(HW // 2))
    enable_lvsa(model, backend="reference")
    try:
        with pytest.raises(ValueError, match=r"image-conditioned calls \(a reference frame appended after the video\)"):
            run(model, x, 500)
    finally:
        disable_lvsa(model)
