"""HunyuanVideo 1.0: LVSA on the dual- and single-stream joint attention (tiny random-weight model, CPU), with
padded text handled without an S x S mask and the token refiner untouched."""
import pytest
import torch

pytest.importorskip("diffusers")
import diffusers.models.transformers.transformer_hunyuan_video as hv_module  # noqa: E402
from diffusers import HunyuanVideoTransformer3DModel  # noqa: E402

from lvsa_kernels import LVSAPattern  # noqa: E402
from lvsa_kernels.diffusers import disable_lvsa, enable_lvsa  # noqa: E402

from diffusers_checks import (assert_dense_pattern_matches_original, assert_svoo_three_way,  # noqa: E402
                              second_step_calls)

T, HW = 8, 4
P = HW * HW
SPARSE = dict(window=1, n_first=1, reference_frames=2, key_frame_interval=4)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                          num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
                                          patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
                                          rope_axes_dim=(2, 2, 4), guidance_embeds=False).eval()


def inputs(seed=1):
    """Batch 2 with different text padding (6 tokens: 5 / 3 valid)."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 4, T, HW, HW, generator=g),
                encoder_hidden_states=torch.randn(2, 6, 16, generator=g),
                encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]]),
                pooled_projections=torch.randn(2, 8, generator=g))


def run(model, x, t):
    with torch.no_grad():
        return model(timestep=torch.full((2,), float(t)), **x).sample


def joint_attns(model):
    return [b.attn for b in [*model.transformer_blocks, *model.single_transformer_blocks]]


def test_dense_pattern_matches_original_processors(model):
    assert_dense_pattern_matches_original(model, inputs(), run, T)


def test_sparse_layers_match_masked_diffusers_processor(model, monkeypatch):
    """Dual- and single-stream layers equal the original processor with its key mask AND the LVSA token mask."""
    x = inputs()
    originals = {id(a): a.processor for a in joint_attns(model)}
    calls, _ = second_step_calls(model, joint_attns(model), run, x, with_kwargs=True, **SPARSE)
    assert len(calls) == 2
    text_len = calls[0][1]["encoder_hidden_states"].shape[1]
    layout = LVSAPattern(**SPARSE).plan(T, P, step=1, text_tokens=text_len, text_position="after")
    assert layout.meta["offset"] == 1 and layout.density < 0.9
    lvsa_mask = layout.to_token_mask()[0]
    dense_dispatch = hv_module.dispatch_attention_fn
    monkeypatch.setattr(hv_module, "dispatch_attention_fn",
                        lambda q, k, v, attn_mask, **kw: dense_dispatch(q, k, v, attn_mask=attn_mask & lvsa_mask, **kw))
    for attn, kwargs, (video, text) in calls:
        with torch.no_grad():
            want_video, want_text = originals[id(attn)](attn, **kwargs)
        valid = kwargs["attention_mask"][:, 0, 0, -text_len:]
        torch.testing.assert_close(video, want_video, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(text[valid], want_text[valid], rtol=1e-5, atol=1e-5)


def test_round_trip_refiner_untouched_and_defaults(model):
    x = inputs()
    before = run(model, x, 500)
    procs = [a.processor for a in joint_attns(model)]
    refiner = model.context_embedder.token_refiner.refiner_blocks[0].attn.processor
    handle = enable_lvsa(model, backend="reference", **SPARSE)
    assert len(handle._originals) == 2
    assert model.context_embedder.token_refiner.refiner_blocks[0].attn.processor is refiner
    sparse = run(model, x, 500)
    disable_lvsa(model)
    assert all(a.processor is p for a, p in zip(joint_attns(model), procs))
    assert torch.equal(run(model, x, 500), before)
    assert not torch.allclose(sparse, before, atol=1e-4)
    handle = enable_lvsa(model)
    try:
        assert handle.runtime.pattern.reference_frames == 33
        assert handle.runtime.reference_source == "HunyuanVideo default (129 video frames)"
    finally:
        handle.disable()


def test_masked_video_keys_are_rejected(model):
    from lvsa_kernels.diffusers.hunyuan_video import LVSAHunyuanVideoAttnProcessor

    proc = LVSAHunyuanVideoAttnProcessor(None, 0)
    mask = torch.ones(1, 1, 1, 10, dtype=torch.bool)
    mask[..., 0] = False
    with pytest.raises(ValueError, match="masks video keys"):
        proc._text_mask(mask, 4)
    with pytest.raises(ValueError, match=r"\[B, 1, 1, S\] key mask"):
        proc._text_mask(torch.ones(1, 10, 10, dtype=torch.bool), 4)


def test_svoo(model):
    assert_svoo_three_way(model, inputs(), run)
