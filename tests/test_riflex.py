"""RIFLEx on Wan and HunyuanVideo 1.5 RoPE: hand-computed intrinsic component and frequency, only that
component's temporal channels change past the reference length, disable_lvsa restores the original RoPE."""
import math

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import HunyuanVideo15Transformer3DModel  # noqa: E402
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed  # noqa: E402

from lvsa_kernels.diffusers import disable_lvsa, enable_lvsa  # noqa: E402
from lvsa_kernels.diffusers.riflex import install_riflex, intrinsic_component, riflex_theta  # noqa: E402

from tiny_wan import inputs, run, tiny_transformer  # noqa: E402


def test_wan_13b_rope_hand_computed():
    # Wan 1.3B: head dim 128 -> 44 temporal channels, theta_j = 10000^(-2j/44), periods 2*pi*10000^(j/22):
    # j=2: 14.5 frames, j=3: 22.06 frames (closest to L = 21), so k = 3; T = 41 frames -> theta_3' = 2*pi/41
    thetas = 10000.0 ** (-2 * torch.arange(22, dtype=torch.float64) / 44)
    assert intrinsic_component(thetas, 21) == 3
    assert riflex_theta(float(thetas[3]), 41) == pytest.approx(2 * math.pi / 41)
    assert riflex_theta(float(thetas[3]), 21) == pytest.approx(float(thetas[3]))  # never raised

    rope = WanRotaryPosEmbed(128, (1, 2, 2), 1024)
    latents = torch.zeros(1, 16, 41, 4, 6)  # T = 41 token frames, P = 2 * 3 = 6
    before_cos, before_sin = rope(latents)
    hook = install_riflex(rope, rope.t_dim, (1, 2, 2), reference_frames=21)
    cos, sin = rope(latents)
    hook.remove()
    t = torch.arange(41, dtype=torch.float64).repeat_interleave(6)
    expected = torch.cos(t * 2 * math.pi / 41)
    torch.testing.assert_close(cos[0, :, 0, 6], expected.to(cos.dtype))
    torch.testing.assert_close(cos[0, :, 0, 7], expected.to(cos.dtype))
    torch.testing.assert_close(sin[0, :, 0, 6], torch.sin(t * 2 * math.pi / 41).to(sin.dtype))
    changed = (cos != before_cos).any(dim=(0, 1, 2)) | (sin != before_sin).any(dim=(0, 1, 2))
    assert changed.nonzero().flatten().tolist() == [6, 7]
    assert all(torch.equal(a, b) for a, b in zip(rope(latents), (before_cos, before_sin)))


def test_wan_riflex_through_enable_lvsa_and_restore():
    model = tiny_transformer(0)  # head dim 12: temporal channels 4, theta = 1 and 0.01 -> periods 6.3 and 628
    x = inputs(batch=1)          # T = 8 frames
    before = run(model, x, 500)
    rope_before = model.rope(x["hidden_states"])
    enable_lvsa(model, backend="reference", reference_frames=8, riflex=True)   # T <= L: RoPE untouched
    assert all(torch.equal(a, b) for a, b in zip(model.rope(x["hidden_states"]), rope_before))
    disable_lvsa(model)
    enable_lvsa(model, backend="reference", reference_frames=5, riflex=True)   # L = 5: k = 0 (period 6.3)
    cos, _ = model.rope(x["hidden_states"])
    t = torch.arange(8, dtype=torch.float64).repeat_interleave(16)
    torch.testing.assert_close(cos[0, :, 0, 0], torch.cos(t * 2 * math.pi / 8).to(cos.dtype))
    disable_lvsa(model)
    assert not model.rope._forward_hooks
    assert all(torch.equal(a, b) for a, b in zip(model.rope(x["hidden_states"]), rope_before))
    assert torch.equal(run(model, x, 500), before)


def test_hunyuan15_riflex_hand_computed():
    # rope_axes_dim (4, 2, 2), theta 256: temporal theta_j = 256^(-2j/4) = 1, 1/16 -> periods 6.3, 100.5 frames
    model = HunyuanVideo15Transformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                             attention_head_dim=8, num_layers=1, num_refiner_layers=1,
                                             text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=12,
                                             rope_axes_dim=(4, 2, 2), task_type="t2v").eval()
    latents = torch.zeros(1, 4, 12, 2, 2)  # T = 12, P = 4
    before = model.rope(latents)
    enable_lvsa(model, backend="reference", reference_frames=90, riflex=True)  # no-op at T = 12 <= 90
    assert all(torch.equal(a, b) for a, b in zip(model.rope(latents), before))
    disable_lvsa(model)
    handle = enable_lvsa(model, backend="reference", reference_frames=8, riflex=True)  # k = 0; 2*pi/12 < 1
    cos, sin = model.rope(latents)
    t = torch.arange(12, dtype=torch.float64).repeat_interleave(4)
    torch.testing.assert_close(sin[:, 1], torch.sin(t * 2 * math.pi / 12).float())
    torch.testing.assert_close(cos[:, 2:], before[0][:, 2:], rtol=0, atol=0)
    handle.disable()
    assert all(torch.equal(a, b) for a, b in zip(model.rope(latents), before))


def test_riflex_unsupported_model_is_a_clear_error():
    from diffusers import CogVideoXTransformer3DModel

    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                        time_embed_dim=4, text_embed_dim=8, num_layers=1, sample_width=8,
                                        sample_height=8, sample_frames=8, patch_size=2, temporal_compression_ratio=4,
                                        max_text_seq_length=8)
    with pytest.raises(NotImplementedError, match=r"riflex \(CogVideoX\): RIFLEx is supported on Wan and "):
        enable_lvsa(model, riflex=True)
    assert "_lvsa_handle" not in model.__dict__


def test_hunyuan_video_10_riflex():
    from diffusers import HunyuanVideoTransformer3DModel

    # rope_axes_dim (4, 2, 2), theta 256: temporal theta_j = 1, 1/16 -> with L = 8, k = 0 (period 6.3 frames)
    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                           num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
                                           text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 2, 2),
                                           guidance_embeds=False).eval()
    latents = torch.zeros(1, 4, 12, 2, 2)
    before = model.rope(latents)
    enable_lvsa(model, backend="reference", reference_frames=8, riflex=True)
    _, sin = model.rope(latents)
    disable_lvsa(model)
    t = torch.arange(12, dtype=torch.float64).repeat_interleave(4)
    torch.testing.assert_close(sin[:, 0], torch.sin(t * 2 * math.pi / 12).float())
    assert all(torch.equal(a, b) for a, b in zip(model.rope(latents), before))
