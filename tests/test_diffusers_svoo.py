"""SVOO through the diffusers shim on tiny random-weight Wan models (CPU, fp32, reference backend)."""
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")
import diffusers.models.transformers.transformer_wan as transformer_wan  # noqa: E402
from diffusers import CogVideoXTransformer3DModel  # noqa: E402

from lvsa_kernels import SVOOPattern  # noqa: E402
from lvsa_kernels.diffusers import disable_lvsa, enable_lvsa, enable_svoo  # noqa: E402

from diffusers_checks import recorded_calls  # noqa: E402
from tiny_wan import T, assert_round_trip, inputs, run, tiny_pipeline, tiny_transformer  # noqa: E402

SPARSE = dict(top_p=0.5, q_clusters=4, k_clusters=8, iterations=2, warmup_steps=0, recluster_every=2)


@pytest.fixture(scope="module")
def model():
    return tiny_transformer(0)


class RecordingSVOO(SVOOPattern):
    """Records (step, layer, branch, cached entries before the call) of every call the runtime plans."""

    def __init__(self, **knobs):
        super().__init__(**knobs)
        self.calls = []

    def plan_call(self, q, k, call):
        self.calls.append((call.step, call.layer, call.branch, len(self._cache)))
        return super().plan_call(q, k, call)


def test_top_p_one_matches_original_processors(model):
    x = inputs()
    expected = run(model, x, 700)
    enable_lvsa(model, pattern=SVOOPattern(top_p=1.0, q_clusters=4, k_clusters=8, warmup_steps=0),
                backend="reference")
    try:
        got = run(model, x, 700)
    finally:
        disable_lvsa(model)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_each_attn1_call_equals_pattern_attention(model, monkeypatch):
    """Each attn1 output equals the original processor whose attention is a twin pattern's `attention`,
    replayed in the same (step, layer, branch) order so both patterns' caches evolve identically."""
    x = inputs()
    originals = {id(b.attn1): b.attn1.processor for b in model.blocks}
    layer_of = {id(b.attn1): i for i, b in enumerate(model.blocks)}
    pattern = RecordingSVOO(**SPARSE)
    with recorded_calls([b.attn1 for b in model.blocks]) as captured:
        enable_lvsa(model, pattern=pattern, backend="reference")
        try:
            for t in (900, 900, 800, 800, 700):   # steps 0, 1 with two CFG calls each, then step 2
                run(model, x, t)
        finally:
            disable_lvsa(model)
    seen = [c[:3] for c in pattern.calls]
    assert seen == [(s, layer, b) for s, b in ((0, 0), (0, 1), (1, 0), (1, 1), (2, 0)) for layer in (0, 1)]
    assert len(captured) == len(seen)

    twin = SVOOPattern(**SPARSE)
    current, densities = {}, []

    def svoo_dispatch(q, k, v, attn_mask=None, **kw):
        assert attn_mask is None and q.shape == (2, T * 16, 2, 12)
        densities.extend(layout.density for layout in SVOOPattern(**SPARSE).plan(q, k, 0, 0).layouts)
        return twin.attention(q, k, v, backend="reference", **current)

    monkeypatch.setattr(transformer_wan, "dispatch_attention_fn", svoo_dispatch)
    for (step, layer, branch), (attn, (hidden, _, _, rotary), out) in zip(seen, captured):
        assert layer_of[id(attn)] == layer
        current.update(step=step, layer=layer, branch=branch)
        with torch.no_grad():
            want = originals[id(attn)](attn, hidden, None, None, rotary)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert max(densities) < 0.9  # the pattern really is sparse


def generate(pipe, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe(prompt_embeds=torch.randn(1, 12, 16, generator=g),
                negative_prompt_embeds=torch.randn(1, 12, 16, generator=g), generator=g,
                height=32, width=32, num_frames=17, num_inference_steps=steps, guidance_scale=5.0,
                output_type="latent").frames


def test_pipeline_steps_branches_and_cache_reset_per_generation():
    pipe = tiny_pipeline()
    pattern = RecordingSVOO(**SPARSE)
    handle = enable_svoo(pipe, backend="reference", **SPARSE)
    disable_lvsa(pipe)
    assert isinstance(handle.runtime.pattern, SVOOPattern) and handle.runtime.pattern.top_p == SPARSE["top_p"]
    enable_lvsa(pipe, pattern=pattern, backend="reference")
    try:
        first = generate(pipe, 3)
        layers = range(len(pipe.transformer.blocks))
        expected = [(s, layer, b) for s in range(3) for b in (0, 1) for layer in layers]
        assert [c[:3] for c in pattern.calls] == expected
        assert pattern.calls[0][3] == 0 and len(pattern._cache) == 2 * len(layers)  # one cache per (layer, branch)
        pattern.calls.clear()
        second = generate(pipe, 3)
    finally:
        disable_lvsa(pipe)
    assert [c[:3] for c in pattern.calls] == expected
    assert pattern.calls[0][3] == 0   # the new generation started with empty SVOO caches
    torch.testing.assert_close(second, first, rtol=0, atol=0)  # so it repeats the first one exactly
    assert type(pipe).__name__ == "WanPipeline" and "_lvsa_handle" not in pipe.__dict__


def test_wan22_two_experts_keep_separate_caches():
    """Wan 2.2 A14B: the high-noise expert runs the early steps, the low-noise one the rest; each expert's
    first call clusters (no cache of its own yet) and the experts never read each other's clusters."""
    pipe = tiny_pipeline(two_experts=True)
    pattern = RecordingSVOO(**SPARSE)
    enable_lvsa(pipe, pattern=pattern, backend="reference")
    try:
        generate(pipe, 4)
    finally:
        disable_lvsa(pipe)
    layers = len(pipe.transformer.blocks)
    experts = [b[0] for _, _, b, _ in pattern.calls]
    assert set(experts) == {0, 1} and experts == sorted(experts)  # expert 0 (high noise) first, then expert 1
    first_low = experts.index(1)
    assert pattern.calls[first_low][2] == (1, 0)
    assert pattern.calls[first_low][3] == 2 * layers  # only expert 0's (layer, branch) caches exist then
    assert {key[1][0] for key in pattern._cache} == {0, 1} and len(pattern._cache) == 2 * 2 * layers


def test_round_trip_restores_processors_and_outputs(model):
    assert_round_trip(model, lambda: enable_svoo(model, backend="reference", **SPARSE))


def test_unsupported_models_and_configs_raise(model):
    torch.manual_seed(0)
    cog = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                      time_embed_dim=4, text_embed_dim=8, num_layers=1, sample_width=8,
                                      sample_height=8, sample_frames=9, patch_size=2, max_text_seq_length=4)
    with pytest.raises(NotImplementedError, match=r"CogVideoX.*supported on Wan"):
        enable_svoo(cog)
    assert "_lvsa_handle" not in cog.__dict__
    with pytest.raises(TypeError, match="do not apply to an SVOOPattern"):
        enable_lvsa(model, pattern=SVOOPattern(), window=3)

    ring = SimpleNamespace(context_parallel_config=SimpleNamespace(ring_degree=2, ulysses_degree=1))
    enable_svoo(model, backend="reference", **SPARSE)  # Ulysses works (test_diffusers_parallel.py); ring raises
    try:
        model._parallel_config = ring
        with pytest.raises(NotImplementedError, match="ring attention"):
            run(model, inputs(batch=1), 500)
    finally:
        del model._parallel_config
        disable_lvsa(model)
