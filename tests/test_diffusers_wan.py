"""LVSA on a tiny random-weight WanTransformer3DModel (CPU, fp32, reference backend)."""
import logging

import pytest
import torch

pytest.importorskip("diffusers")

from lvsa_kernels import LVSAPattern  # noqa: E402
from lvsa_kernels.diffusers import disable_lvsa, enable_lvsa  # noqa: E402

from diffusers_checks import assert_dense_pattern_matches_original, second_step_calls  # noqa: E402

from tiny_wan import H_LAT, T, W_LAT, assert_round_trip, inputs, run, tiny_transformer  # noqa: E402

P = (H_LAT // 2) * (W_LAT // 2)
SPARSE = dict(window=1, n_first=1, reference_frames=2, key_frame_interval=4)


@pytest.fixture(scope="module")
def model():
    return tiny_transformer(0)


def test_dense_pattern_matches_original_processors(model):
    assert_dense_pattern_matches_original(model, inputs(), run, T)


def test_sparse_layers_match_masked_sdpa(model):
    """Every attn1 call equals the original diffusers processor run with the planned layout as a boolean mask."""
    x = inputs()
    originals = {id(b.attn1): b.attn1.processor for b in model.blocks}
    captured, handle = second_step_calls(model, [b.attn1 for b in model.blocks], run, x, **SPARSE)
    assert handle.runtime.tracker.step == 1
    layout = LVSAPattern(**SPARSE).plan(T, P, step=1)
    assert layout.meta["offset"] == 1 and layout.density < 0.9
    mask = layout.to_token_mask()[0]
    assert len(captured) == len(model.blocks)
    for attn, (hidden, _, _, rotary), out in captured:
        with torch.no_grad():
            want = originals[id(attn)](attn, hidden, None, mask, rotary)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_round_trip_restores_processors_and_outputs(model):
    assert_round_trip(model, lambda: enable_lvsa(model, backend="reference", **SPARSE))


def test_default_reference_frames_and_knobs(model):
    handle = enable_lvsa(model)
    try:
        assert handle.runtime.pattern == LVSAPattern(window=3, n_first=1, reference_frames=21)
        assert handle.runtime.reference_source == "Wan default"
        with pytest.raises(RuntimeError, match="already enabled"):
            enable_lvsa(model)
    finally:
        disable_lvsa(model)
    handle = enable_lvsa(model, pattern=LVSAPattern(window=2), key_frame_interval=5)
    try:
        assert handle.runtime.pattern == LVSAPattern(window=2, key_frame_interval=5)
    finally:
        handle.disable()
    with pytest.raises(TypeError, match="unknown knob"):
        enable_lvsa(model, windw=3)
    with pytest.raises(ValueError, match="unknown backend"):
        enable_lvsa(model, backend="no-such-backend")
    with pytest.raises(ValueError, match="not enabled"):
        disable_lvsa(model)
    assert all(type(b.attn1.processor).__name__ == "WanAttnProcessor" for b in model.blocks)


def test_geometry_mismatch_raises(model):
    x = inputs(batch=1)
    enable_lvsa(model, backend="reference", **SPARSE)
    try:
        attn = model.blocks[0].attn1
        with pytest.raises(RuntimeError, match="outside a forward"):
            attn(torch.randn(1, T * P, 24))

        def bad_tokens(module, args):  # drop one token before attn1: the sequence no longer matches T*P
            return (args[0][:, :-1], None, None, None)

        h = attn.register_forward_pre_hook(bad_tokens)
        try:
            with pytest.raises(ValueError, match=r"127 video tokens.*T=8 frames x P=16"):
                run(model, x, 500)
        finally:
            h.remove()
    finally:
        disable_lvsa(model)


def test_one_info_line_per_generation(model, caplog):
    x = inputs()
    enable_lvsa(model, backend="reference", **SPARSE)
    try:
        with caplog.at_level(logging.INFO, logger="lvsa_kernels"):
            for t in (900, 900, 800, 800, 700):   # one generation, CFG as two calls per step
                run(model, x, t)
            run(model, x, 950)                    # timestep went up: a new generation
    finally:
        disable_lvsa(model)
    lines = [r.getMessage() for r in caplog.records if r.name == "lvsa_kernels" and r.levelno == logging.INFO]
    assert len(lines) == 2, lines
    assert lines[0].startswith("LVSA engaged on Wan: T=8 P=16 text=0 kfi=4 offset=0")
    assert "backend=reference" in lines[0] and "density=" in lines[0]
