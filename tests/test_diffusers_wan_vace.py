"""Wan VACE: LVSA on blocks.*.attn1 and vace_blocks.*.attn1 (tiny random-weight model, CPU), and reference-image
latent frames joining the first frames through a tiny `WanVACEPipeline`."""
import PIL.Image
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler, WanVACEPipeline, WanVACETransformer3DModel  # noqa: E402

import lvsa_kernels.diffusers.runtime as runtime_module  # noqa: E402
from lvsa_kernels.diffusers import disable_lvsa, enable_lvsa  # noqa: E402
from lvsa_kernels.diffusers.wan_vace import reference_image_frames  # noqa: E402

from diffusers_checks import assert_dense_pattern_matches_original  # noqa: E402
from tiny_wan import tiny_pipeline  # noqa: E402

T, HW = 6, 8  # latent frames, latent size -> 16 tokens per frame
SPARSE = dict(window=1, n_first=1, reference_frames=2, key_frame_interval=0)


def tiny_vace(seed=0):
    torch.manual_seed(seed)
    return WanVACETransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                     out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
                                     cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
                                     vace_layers=[0, 1], vace_in_channels=72).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_vace()


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 4, T, HW, HW, generator=g),
                encoder_hidden_states=torch.randn(2, 12, 16, generator=g),
                control_hidden_states=torch.randn(2, 72, T, HW, HW, generator=g))


def run(model, x, t):
    with torch.no_grad():
        return model(timestep=torch.full((2,), float(t)), **x).sample


def attn1_processors(model):
    return [b.attn1.processor for b in [*model.blocks, *model.vace_blocks]]


def test_dense_pattern_matches_original_processors(model):
    assert_dense_pattern_matches_original(model, inputs(), run, T)


def test_both_block_lists_replaced_sparse_differs_and_round_trip(model):
    x = inputs()
    before = run(model, x, 500)
    originals = attn1_processors(model)
    cross = [b.attn2.processor for b in model.blocks]
    handle = enable_lvsa(model, backend="reference", **SPARSE)
    assert len(handle._originals) == len(model.blocks) + len(model.vace_blocks) == 4
    assert all(p is not o for p, o in zip(attn1_processors(model), originals))
    assert [p.layer for p in attn1_processors(model)] == [0, 1, 2, 3]
    sparse = run(model, x, 500)
    disable_lvsa(model)
    assert all(p is o for p, o in zip(attn1_processors(model), originals))
    assert all(b.attn2.processor is c for b, c in zip(model.blocks, cross))
    assert torch.equal(run(model, x, 500), before)
    assert not torch.allclose(sparse, before, atol=1e-4)


def test_reference_image_frames():
    img = PIL.Image.new("RGB", (32, 32))
    assert reference_image_frames({}) == 0
    assert reference_image_frames({"reference_images": img}) == 1
    assert reference_image_frames({"reference_images": [img, img]}) == 2
    assert reference_image_frames({"reference_images": [[img, img]]}) == 2


def test_pipeline_reference_images_are_first_frames_and_steps_advance(monkeypatch):
    seen = []
    real = runtime_module.block_sparse_attn

    def spy(q, k, v, layout, **kw):
        seen.append((layout.meta["offset"], layout.meta["n_first"], layout.meta["frames"]))
        return real(q, k, v, layout, **kw)

    monkeypatch.setattr(runtime_module, "block_sparse_attn", spy)
    base = tiny_pipeline()
    pipe = WanVACEPipeline(tokenizer=None, text_encoder=None, vae=base.vae,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=tiny_vace(1))
    g = torch.Generator().manual_seed(0)
    embeds = dict(prompt_embeds=torch.randn(1, 12, 16, generator=g),
                  negative_prompt_embeds=torch.randn(1, 12, 16, generator=g))
    img = PIL.Image.new("RGB", (32, 32), (200, 30, 30))
    enable_lvsa(pipe, backend="reference", window=1, n_first=1, reference_frames=2, key_frame_interval=3)
    try:
        pipe(**embeds, reference_images=[img, img], height=32, width=32, num_frames=9, num_inference_steps=2,
             guidance_scale=5.0, output_type="latent")
        calls = 2 * 4  # CFG x (2 blocks + 2 VACE blocks)
        assert seen[::calls] == [(0, 3, 5), (1, 3, 5)]  # 3 video + 2 reference latent frames; n_first 1 + 2
        seen.clear()
        pipe(**embeds, height=32, width=32, num_frames=9, num_inference_steps=1, guidance_scale=5.0,
             output_type="latent")
        assert set(seen) == {(0, 1, 3)}  # no reference images: back to n_first 1
    finally:
        disable_lvsa(pipe)
