"""LVSA and SVOO on a tiny random-weight Kandinsky5Transformer3DModel: the visual decoder blocks' self-attention
over channels-last [B, T, H, W, C] latents; text blocks and cross-attention untouched (CPU, fp32, reference)."""
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import Kandinsky5Transformer3DModel  # noqa: E402
from diffusers.models.transformers.transformer_kandinsky import Kandinsky5Modulation  # noqa: E402

from lvsa_kernels.diffusers import disable_lvsa, enable_lvsa  # noqa: E402

from diffusers_checks import (assert_dense_pattern_matches_original, assert_sparse_differs_and_round_trip,  # noqa: E402
                              assert_svoo_three_way)

T, HW, TEXT = 8, 8, 5  # latent [B, 8, 8, 8, 4], patch (1, 2, 2): 16 tokens per frame
SPARSE = dict(window=1, n_first=1, reference_frames=2, key_frame_interval=4)


@pytest.fixture(scope="module")
def model():
    """Modulation layers are zero-initialised (every gate 0: attention would not reach the output); random here."""
    torch.manual_seed(0)
    m = Kandinsky5Transformer3DModel(in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=8, out_visual_dim=4,
                                     model_dim=32, ff_dim=32, num_text_blocks=1, num_visual_blocks=2,
                                     axes_dims=(4, 6, 6)).eval()
    for modulation in (mod for mod in m.modules() if isinstance(mod, Kandinsky5Modulation)):
        torch.nn.init.normal_(modulation.out_layer.weight, std=0.3)
    return m


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, T, HW, HW, 4, generator=g),
                encoder_hidden_states=torch.randn(2, TEXT, 16, generator=g),
                pooled_projections=torch.randn(2, 8, generator=g),
                visual_rope_pos=(torch.arange(T), torch.arange(HW // 2), torch.arange(HW // 2)),
                text_rope_pos=torch.arange(TEXT))


def run(model, x, t):
    with torch.no_grad():
        return model(timestep=torch.full((2,), float(t)), **x).sample


def test_dense_pattern_matches_original_processors(model):
    assert_dense_pattern_matches_original(model, inputs(), run, T)


def test_sparse_differs_visual_self_attention_only_and_round_trip(model):
    replaced = [b.self_attention for b in model.visual_transformer_blocks]
    assert_sparse_differs_and_round_trip(model, inputs(), run, replaced, **SPARSE)


def test_svoo(model):
    assert_svoo_three_way(model, inputs(), run)


def test_nabla_sparse_params_are_refused(model):
    enable_lvsa(model, backend="reference")
    try:
        with pytest.raises(ValueError, match=r"sparse_params \(Kandinsky's NABLA sparse attention\)"):
            run(model, {**inputs(), "sparse_params": {"to_fractal": False, "sta_mask": None, "P": 0.9}}, 500)
    finally:
        disable_lvsa(model)
