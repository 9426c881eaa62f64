"""Plan one model's LVSA layout and print it: kfi, rotation offset, |G|, |A|, density, ideal speedup
(1 / density) and the layout's frame map (G global anchor, W window, T text, . skipped)."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..models import MODELS, ModelPreset, get_model
from ._args import NON_NEGATIVE, POSITIVE, UsageError, float_in

if TYPE_CHECKING:
    from ..reference import BlockSparseLayout, LVSAPattern

HELP = "print a model's LVSA layout (frame map, kfi, |G|, |A|, density) at a horizon"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=sorted(MODELS), default="wan", help="model preset (default wan)")
    horizon = parser.add_mutually_exclusive_group(required=True)
    horizon.add_argument("--frames", type=POSITIVE, help="latent frames T")
    horizon.add_argument("--video-frames", type=POSITIVE, help="video frames F (T = (F - 1) // temporal factor + 1; the model's factor, 4 or 8)")
    parser.add_argument("--step", type=NON_NEGATIVE, default=0, help="0-based denoising step (rotation offset = step mod kfi)")
    parser.add_argument("--window", type=NON_NEGATIVE, help="local half-window W in latent frames (default 3)")
    parser.add_argument("--n-first", type=NON_NEGATIVE, help="leading global frames (default 1)")
    parser.add_argument("--reference", type=POSITIVE, help="reference horizon in latent frames (default: the model's)")
    parser.add_argument("--scale", type=float_in(0.0), help="sparsity_scale (default 1.0)")
    parser.add_argument("--kfi", type=NON_NEGATIVE, help="manual keyframe interval (default auto; 0 = none)")
    parser.add_argument("--anchors", choices=["published", "constant"], help="anchor rule (default published)")
    parser.add_argument("--tokens-per-frame", type=POSITIVE, help="tokens per latent frame (default: the model's)")
    parser.add_argument("--text-tokens", type=NON_NEGATIVE,
                        help="text tokens in self-attention (default: the model's; HunyuanVideo 1.5 varies per prompt)")


def pattern_from_args(model: ModelPreset, args: argparse.Namespace) -> LVSAPattern:
    """The model's pattern with the knobs given on the command line."""
    knobs = {"window": args.window, "n_first": args.n_first, "reference_frames": args.reference,
             "sparsity_scale": args.scale, "key_frame_interval": args.kfi, "anchors": args.anchors}
    return model.pattern(**{k: v for k, v in knobs.items() if v is not None})


def summary(pattern: LVSAPattern, frames: int, step: int, layout: BlockSparseLayout) -> str:
    """kfi, offset, |G|, |A| range, frame density and the layout's token density / ideal speedup."""
    mask = pattern.frame_mask(frames, step)
    per_row = mask.sum(1)
    a_lo, a_hi = int(per_row.min()), int(per_row.max())
    frame_density = mask.float().mean().item()
    return "\n".join([
        f"latent frames T={frames}  step={step}  kfi={pattern.key_frame_interval_for(frames)}  "
        f"offset={pattern.rotation_offset(frames, step)}",
        f"|G|={len(pattern.global_frames(frames, step))}  global frames={list(pattern.global_frames(frames, step))}",
        f"|A|={a_lo if a_lo == a_hi else f'{a_lo}..{a_hi}'} frames per query frame",
        f"frame density={frame_density:.4f}  token density (incl. text)={layout.density:.4f}  "
        f"ideal speedup={1 / layout.density:.2f}x",
    ])


def text_line(model: ModelPreset, text: int) -> str:
    """Where the text tokens of ``model``'s self-attention sit, and how many are planned."""
    if model.text_position == "none":
        return "video tokens only (no text in self-attention)"
    line = f"{text} text tokens {model.text_position} the video"
    if model.text_tokens is None:
        line += " (text length varies per prompt; --text-tokens N sets it)"
    return line


def run(args: argparse.Namespace) -> int:
    model = get_model(args.model)
    if model.text_position == "none" and args.text_tokens:
        raise UsageError(f"argument --text-tokens: {model.title} has no text in self-attention, got {args.text_tokens}")
    frames = args.frames if args.frames is not None else model.latent_frames(args.video_frames)
    pattern = pattern_from_args(model, args)
    P = args.tokens_per_frame or model.tokens_per_frame()
    text = args.text_tokens if args.text_tokens is not None else (model.text_tokens or 0)
    position = model.plan_text_position
    layout = pattern.plan(frames, P, step=args.step, text_tokens=text, text_position=position)
    print(f"{model.title}: {model.heads} heads x {model.head_dim}, {P} tokens/frame, {text_line(model, text)}")
    print(pattern.describe(frames, args.step))
    print(summary(pattern, frames, args.step, layout))
    print(layout.describe())
    return 0
