"""Write a tiny random-weight diffusers pipeline folder (no download; seconds on CPU) to try ``generate`` end to
end without a GPU or model weights. The videos are noise (random weights); the pipeline code, LVSA and the
mp4 writing are real. Then, for example:

    python -m lvsa_kernels generate tiny_wan --prompt "a cat runs on the beach" \\
        --frames 17 --height 32 --width 32 --steps 2 --reference-frames 2 --window 1 --output tiny.mp4

``wan_i2v`` takes ``--image PATH``; ``wan_vace`` takes ``--control-video PATH`` and ``--reference-image PATH``.
"""
from __future__ import annotations

import argparse
import os

from ._args import UsageError

HELP = "write a tiny random-weight pipeline folder (Wan T2V, I2V or VACE) to try generate on CPU"
KINDS = ("wan", "wan_i2v", "wan_vace")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="folder to write (must not exist yet, or be empty)")
    parser.add_argument("--model", choices=KINDS, default="wan",
                        help="wan: text to video (default); wan_i2v: image to video; wan_vace: control video and "
                             "reference images")


def run(args: argparse.Namespace) -> int:
    if os.path.exists(args.folder) and (not os.path.isdir(args.folder) or os.listdir(args.folder)):
        raise UsageError(f"argument folder: {args.folder!r} exists and is not an empty folder")
    parent = os.path.dirname(os.path.abspath(args.folder))
    if not os.path.isdir(parent):
        raise UsageError(f"argument folder: parent folder {parent!r} does not exist, got {args.folder!r}")
    try:
        from ..diffusers.tiny_pipeline import TINY_PIPELINES
    except ImportError as exc:
        raise UsageError(f"tiny-pipeline needs diffusers and transformers (pip install -e '.[diffusers,video]'): "
                         f"{exc}") from None
    TINY_PIPELINES[args.model](args.folder)
    extra = {"wan": "", "wan_i2v": " --image first_frame.png",
             "wan_vace": " --control-video control.mp4 --reference-image ref.png"}[args.model]
    print(f"wrote a tiny random {args.model} pipeline to {args.folder}; try (17 video frames = 5 latent frames, "
          "inside Wan's 21-frame horizon, so --reference-frames 2 makes the layout sparse):\n"
          f"  python -m lvsa_kernels generate {args.folder} --prompt \"a cat runs on the beach\" --frames 17 "
          f"--height 32 --width 32 --steps 2 --reference-frames 2 --window 1{extra} --output tiny.mp4")
    return 0
