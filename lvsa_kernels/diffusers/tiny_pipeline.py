"""Tiny random-weight Wan pipelines saved with ``save_pretrained`` (no download: a word-level tokenizer built
here, a 1-layer UMT5, a 4-channel VAE, a 2-layer transformer of 2 heads x 12), to try ``generate`` end to end
on CPU in seconds (``python -m lvsa_kernels tiny-pipeline``) and for the tests. Random weights: the videos are
noise; what runs is the real pipeline code with LVSA in it.

Sizes that work: height and width multiples of 16 px (32 is quick), video frames ``4 k + 1`` (17 = 5 latent
frames).
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

__all__ = ["WORDS", "word_tokenizer", "umt5", "wan_vae", "wan_block_config", "save_tiny_wan", "save_tiny_wan_i2v",
           "save_tiny_wan_vace", "TINY_PIPELINES"]

WORDS = ["<pad>", "</s>", "<unk>", "a", "cat", "dog", "runs", "on", "the", "beach", "blurry"]


def word_tokenizer(**special):
    """A whitespace word-level tokenizer over `WORDS` (ids 0..10; other words map to ``<unk>``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   **special)


def umt5(width: int = 16):
    """A 1-layer random UMT5 encoder of hidden size ``width`` over `WORDS`."""
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(vocab_size=len(WORDS), d_model=width, d_kv=8, d_ff=32, num_layers=1,
                                       num_heads=2, relative_attention_num_buckets=8)).eval()


def wan_vae():
    """A tiny `AutoencoderKLWan`: 4 latent channels, 8x spatial and 4x temporal compression."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                            latents_std=[1.0] * 4).eval()


def wan_block_config() -> dict:
    """The attention/FFN part of the tiny Wan-family transformer configs (2 heads x 12, 2 layers, patch 1x2x2)."""
    return dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def _save_wan_family(path: str, pipeline_cls: str, transformer_cls: str, **transformer_config) -> str:
    import diffusers

    torch.manual_seed(0)
    transformer = getattr(diffusers, transformer_cls)(**{**wan_block_config(), **transformer_config}).eval()
    pipe = getattr(diffusers, pipeline_cls)(tokenizer=word_tokenizer(), text_encoder=umt5(), vae=wan_vae(),
                                            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
                                            transformer=transformer)
    pipe.save_pretrained(path)
    return path


def save_tiny_wan(path: str) -> str:
    """A text-to-video `WanPipeline` saved at ``path``."""
    return _save_wan_family(path, "WanPipeline", "WanTransformer3DModel")


def save_tiny_wan_i2v(path: str) -> str:
    """An image-to-video `WanImageToVideoPipeline` (no CLIP image encoder, as Wan 2.2 I2V: the first frame's
    latents and mask join the noise as 4 + 4 + 4 input channels) saved at ``path``; run it with ``--image``."""
    return _save_wan_family(path, "WanImageToVideoPipeline", "WanTransformer3DModel", in_channels=12)


def save_tiny_wan_vace(path: str) -> str:
    """A `WanVACEPipeline` (2 blocks + 2 VACE blocks) saved at ``path``; run it with ``--control-video`` and
    ``--reference-image``."""
    return _save_wan_family(path, "WanVACEPipeline", "WanVACETransformer3DModel", vace_layers=[0, 1],
                            vace_in_channels=8 + 64)


TINY_PIPELINES: Dict[str, Callable[[str], str]] = {
    "wan": save_tiny_wan, "wan_i2v": save_tiny_wan_i2v, "wan_vace": save_tiny_wan_vace}
