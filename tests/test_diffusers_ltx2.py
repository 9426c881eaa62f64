"""LTX-2: LVSA on the video attn1 only (tiny random-weight audio-video model, CPU); audio self-attention and the
audio/video cross-attentions untouched."""
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import LTX2VideoTransformer3DModel  # noqa: E402

from lvsa_kernels.diffusers import disable_lvsa, enable_lvsa  # noqa: E402

from diffusers_checks import assert_svoo_three_way  # noqa: E402

T, H, W = 6, 4, 4
SPARSE = dict(window=1, n_first=1, reference_frames=2, key_frame_interval=0)


def tiny(rope_type="interleaved", gated=False):
    torch.manual_seed(0)
    return LTX2VideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
                                       cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4,
                                       audio_num_attention_heads=2, audio_attention_head_dim=4,
                                       audio_cross_attention_dim=8, num_layers=2, caption_channels=16,
                                       rope_type=rope_type, gated_attn=gated).eval()


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, T * H * W, 8, generator=g),
                audio_hidden_states=torch.randn(2, 10, 4, generator=g),
                encoder_hidden_states=torch.randn(2, 5, 16, generator=g),
                audio_encoder_hidden_states=torch.randn(2, 5, 16, generator=g),
                num_frames=T, height=H, width=W, audio_num_frames=10)


def run(model, x, t):
    with torch.no_grad():
        out = model(timestep=torch.full((2,), float(t)), **x)
    return torch.cat([out.sample.flatten(1), out.audio_sample.flatten(1)], dim=1)


def other_processors(model):
    names = ("audio_attn1", "attn2", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")
    return [getattr(b, n).processor for b in model.transformer_blocks for n in names if hasattr(b, n)]


@pytest.mark.parametrize("rope_type,gated", [("interleaved", False), ("split", True)])
def test_dense_pattern_matches_original_processors(rope_type, gated):
    model, x = tiny(rope_type, gated), inputs()
    expected = run(model, x, 700)
    enable_lvsa(model, backend="reference", reference_frames=T)
    got = run(model, x, 700)
    disable_lvsa(model)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_sparse_differs_only_video_attn1_replaced_and_round_trip():
    model, x = tiny(), inputs()
    before = run(model, x, 500)
    video = [b.attn1.processor for b in model.transformer_blocks]
    others = other_processors(model)
    assert len(others) >= 2 * len(model.transformer_blocks)
    handle = enable_lvsa(model, backend="reference", **SPARSE)
    assert len(handle._originals) == len(model.transformer_blocks)
    assert all(p is o for p, o in zip(other_processors(model), others))
    sparse = run(model, x, 500)
    disable_lvsa(model)
    assert all(b.attn1.processor is p for b, p in zip(model.transformer_blocks, video))
    assert torch.equal(run(model, x, 500), before)
    assert not torch.allclose(sparse, before, atol=1e-4)


def test_svoo():
    assert_svoo_three_way(tiny(), inputs(), run)
