"""LTX-Video: LVSA on attn1 over packed [B, T*H*W, C] tokens (tiny random-weight model, CPU)."""
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import LTXVideoTransformer3DModel  # noqa: E402

from lvsa_kernels.diffusers import disable_lvsa, enable_lvsa  # noqa: E402

from diffusers_checks import assert_dense_pattern_matches_original, assert_svoo_three_way  # noqa: E402

T, H, W = 6, 4, 4
SPARSE = dict(window=1, n_first=1, reference_frames=2, key_frame_interval=0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                      num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                      num_layers=2, caption_channels=16).eval()


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, T * H * W, 8, generator=g),
                encoder_hidden_states=torch.randn(2, 5, 16, generator=g),
                encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]),
                num_frames=T, height=H, width=W)


def run(model, x, t):
    with torch.no_grad():
        return model(timestep=torch.full((2,), float(t)), **x).sample


def test_dense_pattern_matches_original_processors(model):
    assert_dense_pattern_matches_original(model, inputs(), run, T)


def test_sparse_differs_and_round_trip(model):
    x = inputs()
    before = run(model, x, 500)
    procs = [(b.attn1.processor, b.attn2.processor) for b in model.transformer_blocks]
    enable_lvsa(model, backend="reference", **SPARSE)
    sparse = run(model, x, 500)
    disable_lvsa(model)
    assert all(b.attn1.processor is p1 and b.attn2.processor is p2
               for b, (p1, p2) in zip(model.transformer_blocks, procs))
    assert torch.equal(run(model, x, 500), before)
    assert not torch.allclose(sparse, before, atol=1e-4)


def test_missing_grid_or_conditioning_coords_are_clear_errors(model):
    x = inputs()
    enable_lvsa(model, backend="reference", **SPARSE)
    try:
        with pytest.raises(ValueError, match=r"LTX-Video\): the transformer call needs num_frames, height and width"):
            run(model, {**x, "num_frames": None}, 500)
        coords = torch.zeros(2, 3, T * H * W)
        with pytest.raises(ValueError, match="video_coords .* not supported"):
            run(model, {**x, "video_coords": coords}, 500)
        with pytest.raises(ValueError, match=r"T=3 frames x P=16"):  # grid does not match the packed tokens
            run(model, {**x, "num_frames": 3}, 500)
    finally:
        disable_lvsa(model)


def test_pipeline_rotation_per_step(monkeypatch):
    import lvsa_kernels.diffusers.runtime as runtime_module
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline
    from tiny_pipelines import ltx_vae

    seen = []
    real = runtime_module.block_sparse_attn
    monkeypatch.setattr(runtime_module, "block_sparse_attn",
                        lambda q, k, v, layout, **kw: seen.append(layout.meta["offset"]) or real(q, k, v, layout, **kw))
    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                             num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                             num_layers=1, caption_channels=16).eval()
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=ltx_vae(), text_encoder=None, tokenizer=None,
                       transformer=transformer)
    g = torch.Generator().manual_seed(0)
    enable_lvsa(pipe, backend="reference", window=1, n_first=1, reference_frames=2, key_frame_interval=2)
    try:
        pipe(prompt_embeds=torch.randn(1, 5, 16, generator=g), prompt_attention_mask=torch.ones(1, 5),
             negative_prompt_embeds=torch.randn(1, 5, 16, generator=g), negative_prompt_attention_mask=torch.ones(1, 5),
             height=32, width=32, num_frames=9, num_inference_steps=3, guidance_scale=3.0, output_type="latent")
    finally:
        disable_lvsa(pipe)
    assert seen == [0, 1, 0]  # CFG batched in one call; one layer; offset = step mod kfi


def test_svoo(model):
    assert_svoo_three_way(model, inputs(), run)
