"""Sparse fine-tuning: LoRA adapters (peft) on a tiny random Wan transformer trained with LVSA attention.

On CPU the attention runs on the Triton backend in Triton's interpreter, forward and backward kernels alike (on a
CUDA machine on the GPU). The LoRA gradients equal those of the original diffusers processors fed the same
pattern as a dense boolean mask (masked SDPA), and a few optimizer steps lower the loss.
"""
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import WanTransformer3DModel  # noqa: E402
from peft import LoraConfig  # noqa: E402

from lvsa_kernels import LVSAPattern  # noqa: E402
from lvsa_kernels.diffusers import disable_lvsa, enable_lvsa  # noqa: E402

from tiny_wan import wan_inputs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FRAMES, SIZE = 8, 8              # latent frames, latent height = width; patch (1, 2, 2) -> 16 tokens per frame
PATTERN = LVSAPattern(window=1, n_first=1, reference_frames=2, key_frame_interval=4, rotate=False)


def lora_model() -> WanTransformer3DModel:
    """The tiny diffusers test config with head dim 16 (a Triton head dim) and LoRA on every attention projection;
    lora_B drawn at random (peft starts it at 0, where lora_A would get no gradient)."""
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    return model.to(DEVICE)


def lora_params(model):
    return [p for n, p in model.named_parameters() if "lora_" in n]


def loss_of(model, x, target):
    out = model(timestep=torch.full((1,), 500.0, device=DEVICE), **x).sample
    return torch.nn.functional.mse_loss(out, target)


class MaskedProcessor:
    """The original attn1 processor with the layout's token mask as ``attention_mask`` (dense masked SDPA)."""

    def __init__(self, original, mask):
        self.original, self.mask = original, mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self.original(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb)


def test_lora_gradients_match_dense_masked_attention_and_training_lowers_the_loss():
    model = lora_model()
    x = {k: v.to(DEVICE) for k, v in wan_inputs(FRAMES, SIZE, SIZE, batch=1, seed=3).items()}
    target = torch.randn(1, 4, FRAMES, SIZE, SIZE, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    layout = PATTERN.plan(FRAMES, (SIZE // 2) ** 2, step=0)
    assert layout.density < 0.75

    originals = [b.attn1.processor for b in model.blocks]
    mask = layout.to_token_mask()[0].to(DEVICE)
    for b, proc in zip(model.blocks, originals):
        b.attn1.processor = MaskedProcessor(proc, mask)
    want = torch.autograd.grad(loss_of(model, x, target), lora_params(model))
    for b, proc in zip(model.blocks, originals):
        b.attn1.processor = proc

    enable_lvsa(model, PATTERN, backend="triton")
    try:
        params = lora_params(model)
        got = torch.autograd.grad(loss_of(model, x, target), params)
        for g, w in zip(got, want):
            assert ((g - w).norm() / w.norm()).item() <= 1e-4
        optimizer = torch.optim.AdamW(params, lr=3e-3)
        losses = []
        for _ in range(4):
            optimizer.zero_grad()
            loss = loss_of(model, x, target)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        disable_lvsa(model)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_gradient_checkpointing_recomputes_the_same_sparse_attention():
    """diffusers' gradient checkpointing reruns each block in the backward, after the transformer call ended: the
    recomputed LVSA attention uses that call's geometry and layout, so the gradients are those without it."""
    model = lora_model()
    x = {k: v.to(DEVICE) for k, v in wan_inputs(FRAMES, SIZE, SIZE, batch=1, seed=3).items()}
    target = torch.randn(1, 4, FRAMES, SIZE, SIZE, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    handle = enable_lvsa(model, PATTERN, backend="triton")
    try:
        want = torch.autograd.grad(loss_of(model, x, target), lora_params(model))
        model.enable_gradient_checkpointing()
        got = torch.autograd.grad(loss_of(model, x, target), lora_params(model))
        block = model.blocks[0]
        with pytest.raises(RuntimeError, match="outside a forward"):                 # no recompute, no forward
            block.attn1(block.norm1(torch.randn(1, FRAMES * (SIZE // 2) ** 2, 32, device=DEVICE)))
    finally:
        handle.disable()
    for g, w in zip(got, want):
        assert ((g - w).norm() / w.norm()).item() <= 1e-6


def test_a_second_checkpointed_call_before_the_backward_raises():
    """Checkpointed blocks are recomputed with the latest call's layout, so a grad-enabled call that starts
    before the previous one's backward is refused; a dropped output (no backward possible) or a finished
    backward frees the next call."""
    model = lora_model()
    x = {k: v.to(DEVICE) for k, v in wan_inputs(FRAMES, SIZE, SIZE, batch=1, seed=5).items()}
    target = torch.randn(1, 4, FRAMES, SIZE, SIZE, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    handle = enable_lvsa(model, PATTERN, backend="triton")
    try:
        model.enable_gradient_checkpointing()
        loss = loss_of(model, x, target)
        for _ in range(2):  # a refused call leaves the first one waiting
            with pytest.raises(RuntimeError, match="before the backward of the previous gradient-checkpointed"):
                loss_of(model, x, target)
        loss.backward()
        del loss
        loss_of(model, x, target)          # dropped: its graph is gone, so nothing waits for a backward
        loss_of(model, x, target).backward()
        with torch.no_grad():
            loss_of(model, x, target)
    finally:
        handle.disable()
