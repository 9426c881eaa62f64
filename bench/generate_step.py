#!/usr/bin/env python3
"""Denoising steps through the ``generate`` command's code path, dense vs LVSA, random weights, no download.

Builds a pipeline whose transformer has the real config (Wan 2.1 1.3B, or HunyuanVideo 1.5 480p with
``--model hunyuan15``) and random bf16 weights, with small random text encoders (real hidden sizes, one to
three layers, locally built tokenizers) and a VAE with the real latent channels and compression but few
channels; saves it with ``save_pretrained`` and loads it back with ``generate.load_pipeline``. Then, for
``dense`` and then ``lvsa`` on the loaded pipeline, runs it as ``generate`` does (``enable_attention``,
``call_kwargs``) with ``output_type="latent"`` (the VAE decode is not what is measured) and times every
transformer call with CUDA-synchronised forward hooks. Reported: the median transformer call after the first
denoising step (warm-up, Triton compilation), the speedup, the layout density, the backend, and how far LVSA
moves the output: ``first_call_rel_l2`` = ||lvsa - dense|| / ||dense|| of the first transformer call (same
seed, so the same input), ``latents_rel_l2`` the same for the final latents. ``--layers N`` builds only the first
N transformer blocks (labelled ``layers`` / ``full_depth`` in the JSON) to bound the build time of big models.

    python bench/generate_step.py --model wan --frames 321              # GPU: Wan 1.3B shape, T = 81
    python bench/generate_step.py --model hunyuan15 --frames 193        # GPU: HunyuanVideo 1.5 480p, T = 49
    python bench/generate_step.py --tiny --device cpu                   # CPU dry run on tiny configs (sparse)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from lvsa_kernels.bench.e2e_step import HV15_480P, WAN_1_3B, build
from lvsa_kernels.commands import generate
from lvsa_kernels.commands._pipeline_inputs import read_pipeline_folder
from lvsa_kernels.timing import synchronize

WAN_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
                text_dim=64, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
HV15_TINY = dict(in_channels=65, out_channels=32, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                 num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=64,
                 text_embed_2_dim=32, image_embed_dim=1152, rope_axes_dim=(4, 6, 6), target_size=640,
                 task_type="t2v")
TINY_KNOBS = ["--reference-frames", "2", "--window", "1"]  # --tiny: sparse at the tiny sizes
WORDS = ["<pad>", "</s>", "<unk>", "a", "cat", "runs", "on", "the", "beach", "blurry"]


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def transformer_config(model: str, tiny: bool, layers: Optional[int]) -> Dict[str, Any]:
    """The transformer config: real (Wan 2.1 1.3B, HunyuanVideo 1.5 480p) or tiny, ``layers`` blocks if given."""
    config = {"wan": WAN_TINY if tiny else WAN_1_3B, "hunyuan15": HV15_TINY if tiny else HV15_480P}[model]
    if layers is not None:
        if not 1 <= layers <= config["num_layers"]:
            raise ValueError(f"--layers: expected 1..{config['num_layers']} for {model}, got {layers}")
        config = {**config, "num_layers": layers}
    return config


def build_wan(config: Dict[str, Any], tiny: bool, device: torch.device, dtype: torch.dtype) -> Any:
    """`WanPipeline`: transformer of ``config``, 1-layer UMT5 of width ``text_dim``, 16-channel 8x/4x VAE."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    text = UMT5EncoderModel(UMT5Config(vocab_size=len(WORDS), d_model=config["text_dim"], d_kv=32, d_ff=64,
                                       num_layers=1, num_heads=2, relative_attention_num_buckets=8))
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    return WanPipeline(tokenizer=_word_tokenizer(), text_encoder=text.eval(), vae=vae.eval(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=build(WanTransformer3DModel, config, device, dtype))


def build_hunyuan15(config: Dict[str, Any], tiny: bool, device: torch.device, dtype: torch.dtype) -> Any:
    """`HunyuanVideo15Pipeline`: transformer of ``config``, 3-layer Qwen2.5-VL text model and 1-layer T5 of the
    config's widths, 32-channel 16x/4x VAE."""
    from diffusers import (AutoencoderKLHunyuanVideo15, ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler,
                           HunyuanVideo15Pipeline, HunyuanVideo15Transformer3DModel)
    from tokenizers import pre_tokenizers
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, Qwen2Tokenizer, T5Config
    from transformers import T5EncoderModel

    torch.manual_seed(0)
    width, heads = config["text_embed_dim"], (2 if tiny else 28)
    half_head = width // heads // 2
    qwen = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=257, hidden_size=width, intermediate_size=64, num_hidden_layers=3, num_attention_heads=heads,
        num_key_value_heads=heads // 2 if tiny else 4,
        rope_scaling={"type": "mrope", "mrope_section": [half_head // 4, half_head * 3 // 8,
                                                         half_head - half_head // 4 - half_head * 3 // 8]}))
    t5 = T5EncoderModel(T5Config(vocab_size=384, d_model=config["text_embed_2_dim"], d_kv=32, d_ff=64, num_layers=1,
                                 num_heads=2, relative_attention_num_buckets=8))
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    vae = AutoencoderKLHunyuanVideo15(latent_channels=32, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1)
    return HunyuanVideo15Pipeline(text_encoder=qwen.eval(), tokenizer=tokenizer,
                                  transformer=build(HunyuanVideo15Transformer3DModel, config, device, dtype),
                                  vae=vae.eval(),
                                  scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), text_encoder_2=t5.eval(),
                                  tokenizer_2=ByT5Tokenizer(), guider=ClassifierFreeGuidance(guidance_scale=6.0))


def saved_pipeline(model: str, config: Dict[str, Any], tiny: bool, folder: str, device: torch.device,
                   dtype: torch.dtype) -> str:
    """Build (the transformer directly on ``device`` in ``dtype``) and ``save_pretrained`` the pipeline into
    ``folder`` unless it already holds one with this transformer config."""
    saved = os.path.join(folder, "transformer", "config.json")
    if os.path.isfile(saved):
        with open(saved) as f:
            old = json.load(f)
        if all(json.dumps(old.get(k)) == json.dumps(list(v) if isinstance(v, tuple) else v)
               for k, v in config.items()):
            return folder
        raise ValueError(f"--dir: {folder!r} holds a pipeline with another transformer config; give another --dir")
    pipe = (build_wan if model == "wan" else build_hunyuan15)(config, tiny, device, dtype)
    pipe.save_pretrained(folder)
    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return folder


def timed_calls(transformer: torch.nn.Module, device: torch.device, times: List[float],
                outputs: List[torch.Tensor]) -> List[Any]:
    """Hooks appending the seconds of every forward of ``transformer`` (synchronised on CUDA) to ``times``, and
    the first call's output (float32, on the CPU) to ``outputs``."""
    start: List[float] = []

    def pre(module, args, kwargs):
        synchronize(device)
        start.append(time.perf_counter())

    def post(module, args, kwargs, output):
        synchronize(device)
        times.append(time.perf_counter() - start.pop())
        if not outputs:
            out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
            outputs.append(out.detach().float().cpu())

    return [transformer.register_forward_pre_hook(pre, with_kwargs=True),
            transformer.register_forward_hook(post, with_kwargs=True)]


def run_one(pipe: Any, folder: str, attention: str, args: argparse.Namespace,
            device: torch.device) -> Tuple[Dict[str, Any], torch.Tensor, torch.Tensor]:
    """One generation as ``generate`` runs it (latent output): the record (per-call times after the first
    step, density, backend), the first transformer call's output and the final latents (float32, CPU)."""
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    gen_args = parser.parse_args([folder, "--prompt", "a cat runs on the beach", "--frames", str(args.frames),
                                  "--height", str(args.height), "--width", str(args.width), "--steps",
                                  str(args.steps), "--attention", attention, "--backend", args.backend,
                                  "--device", device.type,
                                  *(TINY_KNOBS if args.tiny and attention == "lvsa" else [])])
    kwargs = generate.call_kwargs(read_pipeline_folder(folder), gen_args)
    kwargs.update(output_type="latent", generator=generate.seeded_generator(gen_args, device))
    handle = generate.enable_attention(pipe, gen_args)
    times: List[float] = []
    outputs: List[torch.Tensor] = []
    hooks = timed_calls(pipe.transformer, device, times, outputs)
    try:
        t0 = time.perf_counter()
        latents = pipe(**kwargs).frames
        wall = time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()
    calls_per_step = len(times) // args.steps
    warm = times[calls_per_step:]
    backend = "pipeline's own (dense)" if handle is None else (handle.runtime.chosen_backend or args.backend)
    record = dict(attention=attention, wall_s=wall, calls=len(times), calls_per_step=calls_per_step,
                  call_median_s=statistics.median(warm), first_step_s=sum(times[:calls_per_step]),
                  density=generate.density_summary(handle), backend=backend)
    if handle is not None:
        handle.disable()
    return record, outputs[0], latents.detach().float().cpu()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return float((a - b).norm() / b.norm())


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["wan", "hunyuan15"], default="wan")
    p.add_argument("--frames", type=int, help="video frames (default: wan 321, hunyuan15 193; --tiny 33)")
    p.add_argument("--height", type=int, help="default 480 (--tiny: 64)")
    p.add_argument("--width", type=int, help="default 832 (--tiny: 64)")
    p.add_argument("--steps", type=int, default=3, help="denoising steps; the first is the warm-up (default 3)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny configs and a sparse pattern at their size (CPU dry run)")
    p.add_argument("--layers", type=int, help="build only this many transformer blocks (default: all)")
    p.add_argument("--dir", help="pipeline folder (default /tmp/lvsa_generate_bench/<model>[_tiny][_L<layers>])")
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    args.frames = args.frames or (33 if args.tiny else {"wan": 321, "hunyuan15": 193}[args.model])
    args.height = args.height or (64 if args.tiny else 480)
    args.width = args.width or (64 if args.tiny else 832)
    args.dir = args.dir or (f"/tmp/lvsa_generate_bench/{args.model}{'_tiny' if args.tiny else ''}"
                            f"{'' if args.layers is None else f'_L{args.layers}'}")
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first step is the warm-up)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = transformer_config(args.model, args.tiny, args.layers)
    folder = saved_pipeline(args.model, config, args.tiny, args.dir, device, dtype)
    pipe = generate.load_pipeline(read_pipeline_folder(folder), dtype).to(device)
    (dense, dense_first, dense_latents), (lvsa, lvsa_first, lvsa_latents) = (
        run_one(pipe, folder, attention, args, device) for attention in ("dense", "lvsa"))
    rows = [dense, lvsa]
    speedup = dense["call_median_s"] / lvsa["call_median_s"]
    difference = dict(first_call_rel_l2=rel_l2(lvsa_first, dense_first),
                      latents_rel_l2=rel_l2(lvsa_latents, dense_latents))
    full_depth = {"wan": WAN_1_3B, "hunyuan15": HV15_480P}[args.model]["num_layers"]
    meta = dict(model=args.model, tiny=args.tiny, layers=config["num_layers"],
                full_depth=not args.tiny and config["num_layers"] == full_depth, frames=args.frames,
                height=args.height, width=args.width, steps=args.steps, dtype=str(dtype),
                device=torch.cuda.get_device_name(device)
                if device.type == "cuda" else "cpu", torch=torch.__version__, triton=_triton_version(),
                command="python bench/generate_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
                date=time.strftime("%Y-%m-%d", time.gmtime()))
    for r in rows:
        print(f"{r['attention']:>5}: transformer call median {r['call_median_s']:.3f} s (first step "
              f"{r['first_step_s']:.2f} s, {r['calls_per_step']} calls/step), wall {r['wall_s']:.2f} s, "
              f"density {r['density']}, backend {r['backend']}")
    print(f"LVSA vs dense per transformer call: {speedup:.2f}x; LVSA moves the first call's output by "
          f"{difference['first_call_rel_l2']:.4f} and the final latents by {difference['latents_rel_l2']:.4f} "
          f"(relative L2)  ({json.dumps(meta)})")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(dict(meta=meta, rows=rows, speedup=speedup, **difference), f, indent=1)
    return 0


def _triton_version():
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
