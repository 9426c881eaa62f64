"""LVSA and SVOO on tiny random-weight Kandinsky 5 and Kandinsky 6 (video + audio) transformers: the visual
self-attention over channels-last [B, T, H, W, C] latents only; text blocks, audio and every cross-attention keep
their processors (CPU, fp32, reference backend)."""
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import Kandinsky5Transformer3DModel, Kandinsky6Transformer3DModel  # noqa: E402
from diffusers.models.transformers.transformer_kandinsky import Kandinsky5Modulation  # noqa: E402

from lvsa_kernels.diffusers import disable_lvsa, enable_lvsa  # noqa: E402

from diffusers_checks import (assert_dense_pattern_matches_original, assert_sparse_differs_and_round_trip,  # noqa: E402
                              assert_svoo_three_way)

T, HW, TEXT = 8, 8, 5  # latent [B, 8, 8, 8, 4], patch (1, 2, 2): 16 tokens per frame
SPARSE = dict(window=1, n_first=1, reference_frames=2, key_frame_interval=4)
SMALL = dict(in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=8, model_dim=32, ff_dim=32, num_text_blocks=1,
             num_visual_blocks=2, axes_dims=(4, 6, 6))


def kandinsky5():
    """Modulation layers are zero-initialised (every gate 0: attention would not reach the output); random here."""
    m = Kandinsky5Transformer3DModel(**SMALL, out_visual_dim=4)
    for modulation in (mod for mod in m.modules() if isinstance(mod, Kandinsky5Modulation)):
        torch.nn.init.normal_(modulation.out_layer.weight, std=0.3)
    return m


def kandinsky6():
    return Kandinsky6Transformer3DModel(**SMALL, out_visual_dim=4, visual_cond=False, in_audio_dim=4, out_audio_dim=4)


@pytest.fixture(scope="module", params=["kandinsky5", "kandinsky6"])
def model(request):
    torch.manual_seed(0)
    return {"kandinsky5": kandinsky5, "kandinsky6": kandinsky6}[request.param]().eval()


def inputs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = dict(hidden_states=torch.randn(2, T, HW, HW, 4, generator=g),
             encoder_hidden_states=torch.randn(2, TEXT, 16, generator=g),
             pooled_projections=torch.randn(2, 8, generator=g))
    if isinstance(model, Kandinsky5Transformer3DModel):
        x.update(visual_rope_pos=(torch.arange(T), torch.arange(HW // 2), torch.arange(HW // 2)),
                 text_rope_pos=torch.arange(TEXT))
    else:
        x.update(audio_hidden_states=torch.randn(2, 6, 4, generator=g))
    return x


def run(model, x, t):
    with torch.no_grad():
        out = model(timestep=torch.full((2,), float(t)), **x)
    audio = getattr(out, "audio_sample", None)
    return out.sample.flatten(1) if audio is None else torch.cat([out.sample.flatten(1), audio.flatten(1)], dim=1)


def video_self_attention(model):
    return [getattr(b, "video_dec_block", b).self_attention for b in model.visual_transformer_blocks]


def test_dense_pattern_matches_original_processors(model):
    assert_dense_pattern_matches_original(model, inputs(model), run, T)


def test_sparse_differs_video_self_attention_only_and_round_trip(model):
    assert_sparse_differs_and_round_trip(model, inputs(model), run, video_self_attention(model), **SPARSE)


def test_svoo(model):
    assert_svoo_three_way(model, inputs(model), run)


def test_refused_calls(model):
    """Kandinsky 5's own NABLA sparse attention; Kandinsky 6's image conditioning (the TI2VA pipeline's reference
    frame: appended last, at temporal RoPE position 0)."""
    x = inputs(model)
    if isinstance(model, Kandinsky5Transformer3DModel):
        x["sparse_params"] = {"to_fractal": False, "sta_mask": None, "P": 0.9}
        message = r"sparse_params \(Kandinsky's NABLA sparse attention\)"
    else:
        x["hidden_states"] = torch.randn(2, T + 1, HW, HW, 4)
        x["visual_rope_pos"] = (torch.cat([torch.arange(T), torch.zeros(1, dtype=torch.long)]), torch.arange(HW // 2),
                                torch.arange(HW // 2))
        message = r"image-conditioned calls \(a reference frame appended after the video\)"
    enable_lvsa(model, backend="reference")
    try:
        with pytest.raises(ValueError, match=message):
            run(model, x, 500)
    finally:
        disable_lvsa(model)
