"""Tiny random-weight diffusers pipelines saved to a folder with ``save_pretrained`` (no downloads): the
tokenizers are built locally, the text encoders and VAEs from small configs. For the ``generate`` command
tests. Import only after ``pytest.importorskip("diffusers")``.
"""
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

WORDS = ["<pad>", "</s>", "<unk>", "a", "cat", "dog", "runs", "on", "the", "beach", "blurry"]


def word_tokenizer(**special) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over `WORDS` (ids 0..10)."""
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   **special)


def save_tiny_wan(path: str) -> str:
    """A `WanPipeline` (2-layer transformer, 1-layer UMT5, tiny VAE) saved at ``path``."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from tiny_wan import tiny_transformer

    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(WORDS), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                               num_heads=2, relative_attention_num_buckets=8)).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    pipe = WanPipeline(tokenizer=word_tokenizer(), text_encoder=text_encoder, vae=vae.eval(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=tiny_transformer(1))
    pipe.save_pretrained(path)
    return path


def byte_level_qwen_tokenizer():
    """A `Qwen2Tokenizer` with the 256 byte-level symbols as vocabulary (no merges) and a chat template."""
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    return tok


def save_tiny_hunyuan15(path: str) -> str:
    """A `HunyuanVideo15Pipeline` (2-layer transformer, 2-layer Qwen2.5-VL text model, 1-layer T5, tiny VAE)
    saved at ``path``."""
    from diffusers import (AutoencoderKLHunyuanVideo15, ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler,
                           HunyuanVideo15Pipeline, HunyuanVideo15Transformer3DModel)
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    qwen = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=257, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=384, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                                 relative_attention_num_buckets=8)).eval()
    vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=12,
        rope_axes_dim=(2, 2, 4), task_type="t2v", target_size=64)
    pipe = HunyuanVideo15Pipeline(text_encoder=qwen, tokenizer=byte_level_qwen_tokenizer(),
                                  transformer=transformer.eval(),
                                  vae=vae.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
                                  text_encoder_2=t5, tokenizer_2=ByT5Tokenizer(),
                                  guider=ClassifierFreeGuidance(guidance_scale=6.0))
    pipe.save_pretrained(path)
    return path
