"""Offline SVOO sparsity profiling: run a Wan transformer with dense attention over calibration inputs and
write the per (step, layer, head) keep ratios covering ``--tau`` of the softmax mass as CSV
``Step,Layer,Head,Sparsity`` (loadable by ``SVOOPattern(profile=PATH)``). As in the published format,
``Step`` is 1-based (row ``Step = s + 1`` serves the pattern's 0-based denoising step ``s``); ``Layer`` and
``Head`` are 0-based.

Only the tiny random Wan transformer (diffusers' test configuration) is built in (``--tiny``); profile a
real checkpoint from Python with ``lvsa_kernels.diffusers.wan_profile.profile_wan(model, ...)``.
"""
from __future__ import annotations

import argparse
import os

from ._args import NON_NEGATIVE, POSITIVE, UsageError, float_in

HELP = "profile SVOO keep ratios (Step,Layer,Head,Sparsity CSV) from a dense transformer run"

TINY_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=["wan"], required=True, help="transformer family")
    parser.add_argument("--tiny", action="store_true", required=True,
                        help="use the tiny random configuration (the only built-in model)")
    parser.add_argument("--out", required=True, help="output CSV path")
    parser.add_argument("--steps", type=POSITIVE, default=4, help="denoising steps (default 4)")
    parser.add_argument("--inputs", type=POSITIVE, default=2, help="calibration inputs, merged by maximum (default 2)")
    parser.add_argument("--tau", type=float_in(0.0, 1.0), default=0.95, help="softmax mass to cover (default 0.95)")
    parser.add_argument("--queries", type=POSITIVE, default=None, help="sampled query rows per head (default: all)")
    parser.add_argument("--latent", type=POSITIVE, nargs=3, default=(2, 16, 16), metavar=("F", "H", "W"),
                        help="latent frames, height, width (default 2 16 16)")
    parser.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed for weights and inputs (default 0)")


def _check(args: argparse.Namespace) -> None:
    """Values that fit their types but not the tiny transformer or the file system."""
    frames, height, width = args.latent
    if height % 2 or width % 2:
        raise UsageError(f"argument --latent: height and width must be even (patch 2x2), got {frames} {height} {width}")
    if max(frames, height // 2, width // 2) > TINY_WAN["rope_max_seq_len"]:
        raise UsageError(f"argument --latent: at most {TINY_WAN['rope_max_seq_len']} frames and "
                         f"{2 * TINY_WAN['rope_max_seq_len']} x {2 * TINY_WAN['rope_max_seq_len']} latent pixels, "
                         f"got {frames} {height} {width}")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise UsageError(f"argument --out: folder {folder!r} does not exist, got {args.out!r}")


def run(args: argparse.Namespace) -> int:
    _check(args)
    try:
        from diffusers import WanTransformer3DModel
    except ImportError:
        raise UsageError("--model wan: needs diffusers (pip install -e '.[diffusers]')") from None
    import torch

    from lvsa_kernels.diffusers.wan_profile import profile_wan

    torch.manual_seed(args.seed)
    model = WanTransformer3DModel(**TINY_WAN).eval()
    g = torch.Generator().manual_seed(args.seed)
    cfg = model.config
    latents = [torch.randn(1, cfg.in_channels, *args.latent, generator=g) for _ in range(args.inputs)]
    prompts = [torch.randn(1, 12, cfg.text_dim, generator=g) for _ in range(args.inputs)]
    profile = profile_wan(model, latents, prompts, args.steps, tau=args.tau, num_queries=args.queries)
    profile.save(args.out)
    keep = profile.keep
    print(f"wrote {args.out}: {profile.steps} steps x {profile.layers} layers x {profile.heads} heads, "
          f"keep ratio mean {keep.mean():.4f}, min {keep.min():.4f}, max {keep.max():.4f}; Step is 1-based "
          f"(row Step = s + 1 serves SVOOPattern's 0-based step s)")
    return 0
