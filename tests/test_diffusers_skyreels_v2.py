"""SkyReels-V2: LVSA on attn1 (tiny random-weight models, CPU) in T2V mode and in diffusion-forcing mode
(LVSA intersected with the block-causal frame mask, step from the pipeline's own iteration)."""
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import (SkyReelsV2DiffusionForcingPipeline, SkyReelsV2Transformer3DModel,  # noqa: E402
                       UniPCMultistepScheduler)

import lvsa_kernels.diffusers.runtime as runtime_module  # noqa: E402
from lvsa_kernels import LVSAPattern  # noqa: E402
from lvsa_kernels.diffusers import disable_lvsa, enable_lvsa, enable_svoo  # noqa: E402

from diffusers_checks import assert_dense_pattern_matches_original  # noqa: E402
from tiny_wan import tiny_pipeline  # noqa: E402

T, HW = 6, 8  # latent frames, latent size -> 16 tokens per frame
SPARSE = dict(window=1, n_first=1, reference_frames=2, key_frame_interval=0)


def tiny_skyreels(frames_per_block=1, seed=0):
    torch.manual_seed(seed)
    return SkyReelsV2Transformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32, num_frame_per_block=frames_per_block).eval()


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 4, T, HW, HW, generator=g),
                encoder_hidden_states=torch.randn(2, 12, 16, generator=g))


def run_t2v(model, x, t):
    with torch.no_grad():
        return model(timestep=torch.full((2,), float(t)), **x).sample


def run_df(model, x, t):
    """Diffusion forcing: per-frame timesteps (later frames noisier)."""
    steps = torch.linspace(float(t) - 300, float(t), T).expand(2, T)
    with torch.no_grad():
        return model(timestep=steps, enable_diffusion_forcing=True, **x).sample


@pytest.mark.parametrize("frames_per_block,run", [(1, run_t2v), (2, run_df)])
def test_dense_pattern_matches_original_processors(frames_per_block, run):
    # in diffusion-forcing mode the original processors get diffusers' S x S block-causal mask; LVSA plans it
    assert_dense_pattern_matches_original(tiny_skyreels(frames_per_block), inputs(), run, T)


@pytest.mark.parametrize("frames_per_block,run", [(1, run_t2v), (3, run_df)])
def test_sparse_differs_and_round_trip(frames_per_block, run):
    model, x = tiny_skyreels(frames_per_block), inputs()
    before = run(model, x, 500)
    originals = [(b.attn1.processor, b.attn2.processor) for b in model.blocks]
    enable_lvsa(model, backend="reference", **SPARSE)
    sparse = run(model, x, 500)
    disable_lvsa(model)
    assert all(b.attn1.processor is p1 and b.attn2.processor is p2 for b, (p1, p2) in zip(model.blocks, originals))
    assert torch.equal(run(model, x, 500), before)
    assert not torch.allclose(sparse, before, atol=1e-4)


def test_diffusion_forcing_layout_is_lvsa_and_block_causal(monkeypatch):
    layouts = []
    real = runtime_module.block_sparse_attn
    monkeypatch.setattr(runtime_module, "block_sparse_attn",
                        lambda q, k, v, layout, **kw: layouts.append(layout) or real(q, k, v, layout, **kw))
    model = tiny_skyreels(frames_per_block=2)
    enable_lvsa(model, backend="reference", **SPARSE)
    try:
        run_df(model, inputs(), 900)
    finally:
        disable_lvsa(model)
    layout = layouts[0]
    assert all(lay is layout for lay in layouts)  # planned once per call, shared by every layer
    block = torch.arange(T) // 2
    expected = LVSAPattern(**SPARSE).frame_mask(T, 0) & (block[None, :] <= block[:, None])
    assert torch.equal(layout.to_block_mask().reshape(T, T), expected)  # one block per frame, 16 tokens each
    assert layout.q_len == layout.kv_len == T * 16 and layout.meta["causal_block"] == 2


def test_svoo_is_a_clear_error():
    with pytest.raises(NotImplementedError, match="SVOO.*supported on Wan"):
        enable_svoo(tiny_skyreels())


def test_pipeline_step_counter_drives_the_rotation(monkeypatch):
    seen, causal = [], set()
    real = runtime_module.block_sparse_attn

    def spy(q, k, v, layout, **kw):
        seen.append(layout.meta["offset"])
        causal.add(layout.meta.get("causal_block"))
        return real(q, k, v, layout, **kw)

    monkeypatch.setattr(runtime_module, "block_sparse_attn", spy)
    pipe = SkyReelsV2DiffusionForcingPipeline(tokenizer=None, text_encoder=None, vae=tiny_pipeline().vae,
                                              scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction",
                                                                                use_flow_sigmas=True, flow_shift=8.0),
                                              transformer=tiny_skyreels(frames_per_block=1))
    g = torch.Generator().manual_seed(0)
    handle = enable_lvsa(pipe, backend="reference", window=1, n_first=1, reference_frames=2, key_frame_interval=4)
    try:
        pipe(None, prompt_embeds=torch.randn(1, 12, 16, generator=g),
             negative_prompt_embeds=torch.randn(1, 12, 16, generator=g),
             height=32, width=32, num_frames=13, base_num_frames=13, num_inference_steps=3, ar_step=1,
             causal_block_size=2, guidance_scale=5.0, output_type="latent")  # block-causal: 4 frames, 2 blocks
        iterations = pipe._num_timesteps
        calls = 2 * len(pipe.transformer.blocks)  # CFG x layers
        assert len(seen) == iterations * calls and iterations > 3  # asynchronous: more iterations than steps
        assert seen[::calls] == [i % 4 for i in range(iterations)]
        assert handle.runtime.tracker.step == iterations - 1
        assert causal == {2}
    finally:
        disable_lvsa(pipe)
