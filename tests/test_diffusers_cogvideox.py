"""LVSA on tiny random-weight CogVideoXTransformer3DModel and ConsisIDTransformer3DModel (CogVideoX's joint attn1
with identity conditioning; CPU, fp32, reference backend). Text comes first."""
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import CogVideoXTransformer3DModel, ConsisIDTransformer3DModel  # noqa: E402
from diffusers.models.embeddings import get_3d_rotary_pos_embed  # noqa: E402

from lvsa_kernels.diffusers import disable_lvsa, enable_lvsa  # noqa: E402

from diffusers_checks import (assert_dense_pattern_matches_original,  # noqa: E402
                              assert_joint_layers_match_masked_original, assert_sparse_differs_and_round_trip)

T, HW, HEAD_DIM, TEXT = 8, 8, 16, 8    # latent [B, T, C, 8, 8], patch 2 -> P = 16 tokens per frame
P = (HW // 2) ** 2
SPARSE = dict(window=1, n_first=1, reference_frames=2, key_frame_interval=4)


def build(patch_size_t=None, sample_frames=9):
    torch.manual_seed(0)
    m = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4,
                                    time_embed_dim=4, text_embed_dim=8, num_layers=2, sample_width=HW,
                                    sample_height=HW, sample_frames=sample_frames, patch_size=2,
                                    patch_size_t=patch_size_t, max_text_seq_length=TEXT,
                                    use_rotary_positional_embeddings=True)
    return m.eval()


@pytest.fixture(scope="module")
def model():
    return build()


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    rope = get_3d_rotary_pos_embed(embed_dim=HEAD_DIM, crops_coords=((0, 0), (HW // 2, HW // 2)),
                                   grid_size=(HW // 2, HW // 2), temporal_size=T)
    return dict(hidden_states=torch.randn(2, T, 4, HW, HW, generator=g),
                encoder_hidden_states=torch.randn(2, TEXT, 8, generator=g), image_rotary_emb=rope)


def run(model, x, t):
    with torch.no_grad():
        return model(timestep=torch.full((2,), float(t)), **x).sample


def test_dense_pattern_matches_original_processors(model):
    assert_dense_pattern_matches_original(model, inputs(), run, T)


def test_sparse_layers_match_masked_sdpa(model):
    """Each attn1 call equals the original processor given the planned layout as a boolean mask."""
    attn1 = [b.attn1 for b in model.transformer_blocks]
    assert_joint_layers_match_masked_original(model, attn1, run, inputs(), T, P, TEXT, mask_batch=2, **SPARSE)


def test_round_trip_restores_processors_and_outputs(model):
    x = inputs()
    before = run(model, x, 500)
    procs = [b.attn1.processor for b in model.transformer_blocks]
    enable_lvsa(model, backend="reference", **SPARSE)
    sparse = run(model, x, 500)
    disable_lvsa(model)
    assert all(b.attn1.processor is p for b, p in zip(model.transformer_blocks, procs))
    assert torch.equal(run(model, x, 500), before)
    assert not torch.allclose(sparse, before, atol=1e-4)


def test_reference_frames_from_config():
    handle = enable_lvsa(build(sample_frames=49))
    try:
        assert handle.runtime.pattern.reference_frames == 13
        assert handle.runtime.reference_source == "config sample_frames"
    finally:
        handle.disable()
    handle = enable_lvsa(build(patch_size_t=2, sample_frames=81))   # CogVideoX 1.5: 21 latent -> 11 token frames
    try:
        assert handle.runtime.pattern.reference_frames == 11
    finally:
        handle.disable()


def test_temporal_patch_geometry():
    """CogVideoX 1.5 (patch_size_t = 2): T counts token frames, so the layout has T_lat / 2 frame blocks."""
    m = build(patch_size_t=2, sample_frames=33)
    x = inputs()
    x.pop("image_rotary_emb")
    seen = []
    handle = enable_lvsa(m, backend="reference", **SPARSE)
    try:
        m.transformer_blocks[0].attn1.register_forward_pre_hook(
            lambda mod, args: seen.append(handle.runtime.layout(TEXT, "before")))
        run(m, x, 500)
    finally:
        handle.disable()
    assert seen[0].meta["frames"] == T // 2 and seen[0].meta["tokens_per_frame"] == P


@pytest.fixture(scope="module")
def consisid():
    torch.manual_seed(0)
    return ConsisIDTransformer3DModel(num_attention_heads=2, attention_head_dim=HEAD_DIM, in_channels=4,
                                      out_channels=4, time_embed_dim=4, text_embed_dim=8, num_layers=2,
                                      sample_width=HW, sample_height=HW, sample_frames=49, patch_size=2,
                                      max_text_seq_length=TEXT, use_rotary_positional_embeddings=True).eval()


def test_consisid_dense_pattern_matches_original_processors(consisid):
    assert_dense_pattern_matches_original(consisid, inputs(), run, T)


def test_consisid_sparse_differs_attn1_only_and_round_trip(consisid):
    assert_sparse_differs_and_round_trip(consisid, inputs(), run, [b.attn1 for b in consisid.transformer_blocks],
                                         **SPARSE)


def test_consisid_reference_frames_from_config(consisid):
    handle = enable_lvsa(consisid)
    try:
        assert handle.runtime.pattern.reference_frames == 13
        assert handle.runtime.reference_source == "config sample_frames"
    finally:
        handle.disable()
