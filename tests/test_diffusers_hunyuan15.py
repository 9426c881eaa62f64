"""LVSA on a tiny random-weight HunyuanVideo15Transformer3DModel (CPU, fp32, reference backend).

Text follows the video and is padded; the per-batch valid lengths differ (CFG cond / uncond).
"""
import pytest
import torch

pytest.importorskip("diffusers")
import diffusers.models.transformers.transformer_hunyuan_video15 as hv_module  # noqa: E402
from diffusers import HunyuanVideo15Transformer3DModel  # noqa: E402

from lvsa_kernels import LVSAPattern  # noqa: E402
from lvsa_kernels.diffusers import disable_lvsa, enable_lvsa  # noqa: E402

from diffusers_checks import assert_dense_pattern_matches_original, second_step_calls  # noqa: E402
from lvsa_kernels.diffusers.geometry import VideoGeometry  # noqa: E402
from lvsa_kernels.diffusers.hunyuan15 import text_valid_lengths  # noqa: E402

T, HW = 8, 4                       # patch 1: P = 16 tokens per frame
P = HW * HW
SPARSE = dict(window=1, n_first=1, reference_frames=2, key_frame_interval=4)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = HunyuanVideo15Transformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                         num_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1,
                                         patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=12,
                                         rope_axes_dim=(2, 2, 4), task_type="t2v")
    return m.eval()


def inputs(seed=1):
    """Batch 2 with different text padding (MLLM 6 tokens: 5 / 3 valid; ByT5 3 tokens: 2 / 1 valid)."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 4, T, HW, HW, generator=g),
                encoder_hidden_states=torch.randn(2, 6, 16, generator=g),
                encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]]),
                encoder_hidden_states_2=torch.randn(2, 3, 8, generator=g),
                encoder_attention_mask_2=torch.tensor([[1, 1, 0], [1, 0, 0]]),
                image_embeds=torch.zeros(2, 2, 12))


def run(model, x, t):
    with torch.no_grad():
        return model(timestep=torch.full((2,), float(t)), **x).sample


def test_dense_pattern_matches_original_processors(model):
    assert_dense_pattern_matches_original(model, inputs(), run, T)


def test_sparse_layers_match_masked_diffusers_processor(model, monkeypatch):
    """Each layer equals the original processor (its padding mask) AND the planned LVSA token mask, on valid rows."""
    x = inputs()
    originals = {id(b.attn): b.attn.processor for b in model.transformer_blocks}
    calls, _ = second_step_calls(model, [b.attn for b in model.transformer_blocks], run, x, with_kwargs=True, **SPARSE)
    assert len(calls) == len(model.transformer_blocks)
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
        valid = kwargs["attention_mask"].bool()
        torch.testing.assert_close(video, want_video, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(text[valid], want_text[valid], rtol=1e-5, atol=1e-5)


def test_padded_text_holding_garbage_is_ignored(model):
    """Padded text positions hold huge values: valid rows equal the dense masked diffusers processor, padded
    text rows give exactly zero attention output (to_add_out's bias after the projection)."""
    torch.manual_seed(3)
    attn = model.transformer_blocks[0].attn
    original = attn.processor
    n_video, text_len = T * P, 7
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0]])
    hidden = torch.randn(2, n_video, 16)
    text = torch.randn(2, text_len, 16)
    text[~mask.bool()] = 1e4 * torch.randn(int((~mask.bool()).sum()), 16)
    with torch.no_grad():
        want_video, want_text = original(attn, hidden, text, mask)
    handle = enable_lvsa(model, backend="reference", reference_frames=T)
    try:
        with torch.no_grad():
            handle.runtime.begin_forward(VideoGeometry(T, HW, HW), 500.0)  # what the forward pre-hook records
            got_video, got_text = attn(hidden_states=hidden, encoder_hidden_states=text, attention_mask=mask)
            handle.runtime.end_forward()
    finally:
        disable_lvsa(model)
    valid = mask.bool()
    torch.testing.assert_close(got_video, want_video, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_text[valid], want_text[valid], rtol=1e-5, atol=1e-5)
    bias = attn.to_add_out.bias.expand(int((~valid).sum()), -1)
    torch.testing.assert_close(got_text[~valid], bias, rtol=0, atol=0)


def test_text_valid_lengths():
    assert text_valid_lengths(torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]]), 3, 3) == [2, 3, 0]
    assert text_valid_lengths(None, 2, 5) == [5, 5]
    with pytest.raises(ValueError, match="batch element 1"):
        text_valid_lengths(torch.tensor([[1, 1, 0], [1, 0, 1]]), 2, 3)
    with pytest.raises(ValueError, match=r"\[B, L\] = \[2, 4\]"):
        text_valid_lengths(torch.ones(2, 3), 2, 4)


def test_round_trip_and_defaults(model):
    x = inputs()
    before = run(model, x, 500)
    procs = [b.attn.processor for b in model.transformer_blocks]
    refiner = model.context_embedder.token_refiner.refiner_blocks[0].attn.processor
    handle = enable_lvsa(model, backend="reference", **SPARSE)
    assert handle.runtime.pattern == LVSAPattern(**SPARSE)
    assert model.context_embedder.token_refiner.refiner_blocks[0].attn.processor is refiner
    sparse = run(model, x, 500)
    disable_lvsa(model)
    assert all(b.attn.processor is p for b, p in zip(model.transformer_blocks, procs))
    assert torch.equal(run(model, x, 500), before)
    assert not torch.allclose(sparse, before, atol=1e-4)
    handle = enable_lvsa(model)
    try:
        assert handle.runtime.pattern.reference_frames == 33
        assert handle.runtime.reference_source == "HunyuanVideo 1.5 default"
    finally:
        handle.disable()


def test_svoo_on_joint_attention(model):
    """SVOO on HunyuanVideo 1.5: only the video is clustered, the valid text is one block after it. top_p = 1
    equals the original processors; a sparse pattern keeps one cache per (layer, batch element) because the
    two elements have different valid text lengths."""
    from lvsa_kernels import SVOOPattern
    from lvsa_kernels.diffusers import enable_svoo

    x = inputs()
    expected = run(model, x, 700)
    enable_svoo(model, backend="reference", top_p=1.0, q_clusters=4, k_clusters=8, warmup_steps=0)
    try:
        torch.testing.assert_close(run(model, x, 700), expected, rtol=1e-5, atol=1e-5)
    finally:
        disable_lvsa(model)
    pattern = SVOOPattern(top_p=0.3, q_clusters=4, k_clusters=8, warmup_steps=0, recluster_every=2)
    enable_lvsa(model, pattern=pattern, backend="reference")
    try:
        first = run(model, x, 900)
        second = run(model, x, 800)   # reuses the clusters of the first step
    finally:
        disable_lvsa(model)
    assert torch.isfinite(first).all() and torch.isfinite(second).all()
    assert not torch.allclose(second, run(model, x, 800), atol=1e-4)  # really sparse
    layers = len(model.transformer_blocks)
    assert sorted(pattern._cache) == [(layer, (0, part)) for layer in range(layers) for part in (0, 1)]
    assert all(e.step == 1 and e.clustering.q.perm.shape == (2, T * P) for e in pattern._cache.values())
