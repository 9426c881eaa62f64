"""The model table is the one source of model knowledge: every row has one diffusers adapter keyed by its name,
whose transformer class is the row's ``diffusers_class``, and `enable_lvsa`'s default pattern is the row's."""
import dataclasses

import pytest

from lvsa_kernels.models import MODELS, ModelPreset

diffusers = pytest.importorskip("diffusers")

from lvsa_kernels.diffusers.integration import SUPPORTED_MODELS, _make_pattern  # noqa: E402


def test_one_adapter_per_row_in_table_order():
    assert [spec.model for spec in SUPPORTED_MODELS] == list(MODELS)
    for spec in SUPPORTED_MODELS:
        row = MODELS[spec.model]
        assert spec.preset is row
        assert isinstance(getattr(diffusers, row.diffusers_class), type), row.diffusers_class  # names a class


def test_default_pattern_follows_the_row():
    """The shim's default pattern takes the row's LVSA defaults (window, first frames); knobs override them."""
    spec = next(s for s in SUPPORTED_MODELS if s.model == "wan")
    row = dataclasses.replace(MODELS["wan"], window=5, n_first=2)
    config = {"sample_frames": 0, "in_channels": 16}
    MODELS["wan"], saved = row, MODELS["wan"]
    try:
        pattern, source = _make_pattern(spec, config, None, {})
        assert (pattern.window, pattern.n_first, pattern.reference_frames, source) == (5, 2, 21, "Wan default")
        pattern, source = _make_pattern(spec, config, None, {"window": 1, "reference_frames": 9})
        assert (pattern.window, pattern.n_first, pattern.reference_frames) == (1, 2, 9)
    finally:
        MODELS["wan"] = saved


def test_row_checks_text_position():
    with pytest.raises(ValueError, match="text_position"):
        ModelPreset("x", "X", heads=1, head_dim=64, reference_frames=4, spatial_factor=8, patch=2, height=64,
                    width=64, text_position="middle", text_tokens=0, diffusers_class="X")


# every video transformer diffusers 0.42.1 ships
DIFFUSERS_VIDEO_TRANSFORMERS = [
    "CogVideoXTransformer3DModel", "ConsisIDTransformer3DModel", "LatteTransformer3DModel",
    "AllegroTransformer3DModel", "ChronoEditTransformer3DModel", "CosmosTransformer3DModel", "Cosmos3OmniTransformer",
    "EasyAnimateTransformer3DModel", "HunyuanVideoTransformer3DModel", "HunyuanVideo15Transformer3DModel",
    "HunyuanVideoFramepackTransformer3DModel", "Kandinsky5Transformer3DModel", "Kandinsky6Transformer3DModel",
    "LTXVideoTransformer3DModel", "LTX2VideoTransformer3DModel", "MochiTransformer3DModel",
    "MotifVideoTransformer3DModel", "SanaVideoTransformer3DModel", "SkyReelsV2Transformer3DModel",
    "WanTransformer3DModel", "WanAnimateTransformer3DModel", "WanAnimate2Transformer3DModel",
    "WanVACETransformer3DModel",
]


def test_every_diffusers_video_transformer_is_supported_or_refused_with_a_reason():
    from lvsa_kernels.diffusers.integration import UNSUPPORTED_MODELS

    supported = {row.diffusers_class for row in MODELS.values()}
    refused = {cls.__name__ for cls in UNSUPPORTED_MODELS}
    assert not supported & refused
    assert sorted(supported | refused) == sorted(DIFFUSERS_VIDEO_TRANSFORMERS)
    assert len(supported) == 18 and len(refused) == 5
