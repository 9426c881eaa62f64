"""Pre-tune the Triton kernel for a model's LVSA layout on this GPU, or show the tuned launch configs.

Tuning times every candidate config on random inputs of the model's real shape and stores the winner in
the on-disk cache (``$LVSA_KERNELS_CACHE_DIR/triton_configs.json``, default ``~/.cache/lvsa_kernels``), so
later processes start with it. ``--show`` prints the cache without tuning (works without a GPU).
"""
from __future__ import annotations

import argparse

from ..models import MODELS, get_model
from ._args import POSITIVE

HELP = "pre-tune the Triton kernel for a model's layout (CUDA), or --show the tuned configs"

_DTYPES = ("bf16", "fp16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=sorted(MODELS), default="wan", help="model preset (default wan)")
    parser.add_argument("--frames", type=POSITIVE, default=121, help="latent frames T (default 121)")
    parser.add_argument("--dtype", choices=_DTYPES, default="bf16")
    parser.add_argument("--retune", action="store_true", help="time the candidates again even if a config is cached")
    parser.add_argument("--show", action="store_true", help="only print the cached configs")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..triton_src import tuning

    path = tuning.cache_path()
    if args.show:
        from ..backends.triton_backend import kernel_note

        print(f"kernels: {kernel_note()}")
        configs = tuning.stored_configs()
        print(f"tuned Triton configs in {path}:" if configs else f"no tuned Triton configs in {path}")
        for key, cfg in sorted(configs.items()):
            print(f"  {key}: {cfg}")
        return 0
    if not torch.cuda.is_available():
        print("tune: needs a CUDA GPU (the CPU interpreter always uses a fixed small config); use --show to list the cache")
        return 2
    from ..backends.triton_backend import choose_config, config_key

    model = get_model(args.model)
    text = model.text_tokens or 0
    layout = model.pattern().plan(args.frames, model.tokens_per_frame(), text_tokens=text,
                                  text_position=model.plan_text_position)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    q, k, v = (torch.randn(1, layout.q_len, model.heads, model.head_dim, device="cuda", dtype=dtype) for _ in range(3))
    cfg = choose_config(q, k, v, layout, model.head_dim ** -0.5, retune=args.retune)
    key = config_key(q, k, v, layout)
    print(f"{model.title}, T={args.frames}, {args.dtype}: {cfg}\n  key {key}\n  cache {path}")
    return 0
