"""Tiny random-weight diffusers pipelines saved to a folder with ``save_pretrained`` (no downloads): the
tokenizers are built locally, the text encoders and VAEs from small configs. For the ``generate`` command
tests; the Wan family's builders are the package's own
(`lvsa_kernels.diffusers.tiny_pipeline`). Import only after ``pytest.importorskip("diffusers")``.
"""
import torch
from tokenizers import pre_tokenizers

from lvsa_kernels.diffusers.tiny_pipeline import WORDS, umt5, wan_block_config, wan_vae, word_tokenizer


def t5_encoder():
    """A 1-layer random T5 encoder of hidden size 16 over `WORDS`."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                   relative_attention_num_buckets=8)).eval()


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










def save_tiny_skyreels_v2(path: str, diffusion_forcing: bool) -> str:
    """A `SkyReelsV2Pipeline` (T2V), or with ``diffusion_forcing`` a `SkyReelsV2DiffusionForcingPipeline` whose
    transformer has ``num_frame_per_block=2`` (block-causal self-attention), saved at ``path``."""
    from diffusers import (SkyReelsV2DiffusionForcingPipeline, SkyReelsV2Pipeline, SkyReelsV2Transformer3DModel,
                           UniPCMultistepScheduler)

    torch.manual_seed(0)
    transformer = SkyReelsV2Transformer3DModel(**wan_block_config(), num_frame_per_block=2 if diffusion_forcing else 1)
    cls = SkyReelsV2DiffusionForcingPipeline if diffusion_forcing else SkyReelsV2Pipeline
    pipe = cls(tokenizer=word_tokenizer(), text_encoder=umt5(), vae=wan_vae(), transformer=transformer.eval(),
               scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                 flow_shift=8.0))
    pipe.save_pretrained(path)
    return path


def save_tiny_hunyuan_video(path: str) -> str:
    """A `HunyuanVideoPipeline` (HunyuanVideo 1.0: 1 dual- + 1 single-stream block, 2-layer Llama, 1-layer CLIP
    text model, word-level tokenizers, tiny VAE) saved at ``path``."""
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    llama = LlamaModel(LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)).eval()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(WORDS), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, pad_token_id=0,
                                        eos_token_id=1)).eval()
    vae = AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                    norm_num_groups=4).eval()
    transformer = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                 attention_head_dim=8, num_layers=1, num_single_layers=1,
                                                 num_refiner_layers=1, patch_size=1, patch_size_t=1,
                                                 text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4),
                                                 guidance_embeds=True).eval()
    pipe = HunyuanVideoPipeline(text_encoder=llama, tokenizer=word_tokenizer(), transformer=transformer, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=clip,
                                tokenizer_2=word_tokenizer())
    pipe.save_pretrained(path)
    return path


def ltx_vae():
    """A tiny `AutoencoderKLLTXVideo`: 8 latent channels, 4x spatial and 4x temporal compression."""
    from diffusers import AutoencoderKLLTXVideo

    return AutoencoderKLLTXVideo(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
                                 decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                                 decoder_layers_per_block=(1, 1, 1, 1, 1),
                                 spatio_temporal_scaling=(True, True, False, False),
                                 decoder_spatio_temporal_scaling=(True, True, False, False),
                                 decoder_inject_noise=(False, False, False, False, False),
                                 upsample_residual=(False, False, False, False), upsample_factor=(1, 1, 1, 1),
                                 timestep_conditioning=False, patch_size=1, patch_size_t=1, encoder_causal=True,
                                 decoder_causal=False).eval()


def save_tiny_ltx_video(path: str) -> str:
    """An `LTXPipeline` (1-layer transformer, 1-layer T5, tiny VAE with 8x spatial / 4x temporal compression)
    saved at ``path``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    torch.manual_seed(0)
    t5 = t5_encoder()
    vae = ltx_vae()
    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                             num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                             num_layers=1, caption_channels=16).eval()
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=t5,
                       tokenizer=word_tokenizer(), transformer=transformer)
    pipe.save_pretrained(path)
    return path


def save_tiny_ltx2(path: str) -> str:
    """An `LTX2Pipeline` (1-layer audio-video transformer, 2-layer Gemma 3 text model, 1-layer text connectors,
    tiny video / audio VAEs and vocoder) saved at ``path``. The text encoder is the bare `Gemma3TextModel` (the
    pipeline only reads its hidden states), so diffusers logs that it expected `Gemma3ForConditionalGeneration`."""
    from diffusers import (AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, FlowMatchEulerDiscreteScheduler,
                           LTX2Pipeline, LTX2VideoTransformer3DModel)
    from diffusers.pipelines.ltx2 import LTX2TextConnectors, LTX2Vocoder
    from transformers import Gemma3TextConfig, Gemma3TextModel

    torch.manual_seed(0)
    text = Gemma3TextModel(Gemma3TextConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                            head_dim=8, pad_token_id=0, sliding_window=8)).eval()
    connector = dict(num_attention_heads=2, attention_head_dim=8, num_layers=1, num_learnable_registers=None)
    connectors = LTX2TextConnectors(caption_channels=16, text_proj_in_factor=3, connector_rope_base_seq_len=32,
                                    **{f"{m}_connector_{k}": v for m in ("video", "audio") for k, v in connector.items()})
    vae = AutoencoderKLLTX2Video(latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                                 layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
                                 spatio_temporal_scaling=(True, True, False, False),
                                 decoder_spatio_temporal_scaling=(True, True, False), decoder_inject_noise=(False,) * 4,
                                 upsample_residual=(False, False, False), upsample_factor=(1, 1, 1), patch_size=1,
                                 patch_size_t=1).eval()
    # audio latents: 4 channels x (16 mel bins / 4) = 16 = base_channels (the size of the latent statistics)
    audio_vae = AutoencoderKLLTX2Audio(base_channels=16, output_channels=2, ch_mult=(1, 2), num_res_blocks=1,
                                       latent_channels=4, mel_bins=16).eval()
    vocoder = LTX2Vocoder(in_channels=2 * 16, hidden_channels=8, out_channels=2, upsample_kernel_sizes=[4, 4],
                          upsample_factors=[2, 2], resnet_kernel_sizes=[3], resnet_dilations=[[1]]).eval()
    transformer = LTX2VideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
                                              cross_attention_dim=16, audio_in_channels=16, audio_out_channels=16,
                                              audio_num_attention_heads=2, audio_attention_head_dim=4,
                                              audio_cross_attention_dim=8, num_layers=1, caption_channels=16).eval()
    pipe = LTX2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, audio_vae=audio_vae, text_encoder=text,
                        tokenizer=word_tokenizer(), connectors=connectors, transformer=transformer, vocoder=vocoder)
    pipe.save_pretrained(path)
    return path


def save_tiny_cogvideox(path: str) -> str:
    """A `CogVideoXPipeline` (2-layer transformer with RoPE, 1-layer T5, tiny VAE) saved at ``path``."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(0)
    t5 = t5_encoder()
    vae = AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
                                 norm_num_groups=2, temporal_compression_ratio=4).eval()
    transformer = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                              out_channels=4, time_embed_dim=4, text_embed_dim=16, num_layers=2,
                                              sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
                                              max_text_seq_length=226, use_rotary_positional_embeddings=True).eval()
    pipe = CogVideoXPipeline(tokenizer=word_tokenizer(), text_encoder=t5, vae=vae, transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler())
    pipe.save_pretrained(path)
    return path


def save_tiny_mochi(path: str) -> str:
    """A `MochiPipeline` (2-layer transformer, 1-layer T5, tiny VAE: 12 latent channels as the pipeline requires,
    8x spatial and 6x temporal compression) saved at ``path``."""
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel

    torch.manual_seed(0)
    t5 = t5_encoder()
    vae = AutoencoderKLMochi(latent_channels=12, out_channels=3, encoder_block_out_channels=(32,) * 4,
                             decoder_block_out_channels=(32,) * 4, layers_per_block=(1,) * 5,
                             latents_mean=(0.0,) * 12, latents_std=(1.0,) * 12).eval()
    transformer = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                          pooled_projection_dim=16, in_channels=12, text_embed_dim=16,
                                          time_embed_dim=4, max_sequence_length=16).eval()
    pipe = MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=t5,
                         tokenizer=word_tokenizer(), transformer=transformer)
    pipe.save_pretrained(path)
    return path


def save_tiny_motif_video(path: str) -> str:
    """A `MotifVideoPipeline` (1 dual-stream + 2 single-stream blocks, one of them a decoder block; 1-layer T5Gemma 2
    encoder; tiny Wan VAE; the transformer takes latents + condition latents + mask = 9 channels) saved at ``path``."""
    from diffusers import (ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, MotifVideoPipeline,
                           MotifVideoTransformer3DModel)
    from transformers import T5Gemma2Encoder
    from transformers.models.t5gemma2.configuration_t5gemma2 import T5Gemma2EncoderConfig, T5Gemma2TextConfig

    torch.manual_seed(0)
    text = T5Gemma2TextConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=8, pad_token_id=0,
                              sliding_window=8, dropout_rate=0.0)
    transformer = MotifVideoTransformer3DModel(in_channels=9, out_channels=4, num_attention_heads=2,
                                               attention_head_dim=8, num_layers=1, num_single_layers=2,
                                               num_decoder_layers=1, mlp_ratio=2.0, text_embed_dim=16,
                                               rope_axes_dim=(2, 2, 4)).eval()
    pipe = MotifVideoPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=wan_vae(),
                              text_encoder=T5Gemma2Encoder(T5Gemma2EncoderConfig(text_config=text)).eval(),
                              tokenizer=word_tokenizer(), transformer=transformer,
                              guider=ClassifierFreeGuidance(guidance_scale=5.0))
    pipe.save_pretrained(path)
    return path


def save_tiny_wan_animate(path: str) -> str:
    """A `WanAnimatePipeline` (2-layer transformer with a face adapter per block, 16 x 16 px face images, a 2-layer
    CLIP vision encoder, 1-layer UMT5, tiny Wan VAE) saved at ``path``; run it with ``--image``, ``--pose-video``
    (32 x 32 px) and ``--face-video``."""
    from diffusers import UniPCMultistepScheduler, WanAnimatePipeline, WanAnimateTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=32, patch_size=16)).eval()
    transformer = WanAnimateTransformer3DModel(
        **{**wan_block_config(), "in_channels": 12}, latent_channels=4, image_dim=16,
        motion_encoder_channel_sizes={"4": 8, "8": 8, "16": 8}, motion_encoder_size=16, motion_style_dim=8,
        motion_dim=4, motion_encoder_dim=8, face_encoder_hidden_dim=16, face_encoder_num_heads=2,
        inject_face_latents_blocks=1, motion_encoder_batch_size=4).eval()
    pipe = WanAnimatePipeline(tokenizer=word_tokenizer(), text_encoder=umt5(), vae=wan_vae(),
                              scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction",
                                                                use_flow_sigmas=True, flow_shift=5.0),
                              image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              image_encoder=clip, transformer=transformer)
    pipe.save_pretrained(path)
    return path
