"""Generate a video with a local diffusers pipeline folder and LVSA (or SVOO, or dense attention for
comparison): loads the pipeline without downloading anything, installs the sparse attention with the
model's defaults (`enable_lvsa`), runs the pipeline with its progress bar, writes an mp4 and prints the
wall time, the layout density and the attention backend.

Writing the mp4 needs imageio and imageio-ffmpeg, and the Wan VACE / SkyReels-V2 pipelines need ftfy:
``pip install "lvsa_kernels[video]"``.
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import sys
import time
from typing import Any, Dict, Optional

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads inside the functions, so --help stays light
    import torch

HELP = "generate a video with a local diffusers pipeline folder and LVSA / SVOO / dense attention"

_DTYPES = ("float16", "bfloat16", "float32")
_LVSA_KNOBS = {"window": int, "n_first": int, "reference_frames": int, "sparsity_scale": float,
               "key_frame_interval": int}
_SVOO_KNOBS = {"top_p": float, "q_clusters": int, "k_clusters": int, "warmup_steps": int}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", help="local diffusers pipeline folder (holds model_index.json)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt")
    parser.add_argument("--frames", type=int, help="video frames (default: the pipeline's)")
    parser.add_argument("--height", type=int, help="pixels (default: the pipeline's)")
    parser.add_argument("--width", type=int, help="pixels (default: the pipeline's)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the pipeline's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["auto", *_DTYPES], default="auto",
                        help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--attention", choices=["lvsa", "svoo", "dense"], default="lvsa",
                        help="lvsa (default), svoo, or dense (the pipeline's own attention, for comparison)")
    parser.add_argument("--backend", default="auto", help="block_sparse_attn backend (default auto)")
    lvsa = parser.add_argument_group("LVSA pattern knobs (default: the model's)")
    for name, kind in _LVSA_KNOBS.items():
        lvsa.add_argument(f"--{name.replace('_', '-')}", type=kind)
    svoo = parser.add_argument_group("SVOO knobs (default: SVOOPattern's)")
    for name, kind in _SVOO_KNOBS.items():
        svoo.add_argument(f"--{name.replace('_', '-')}", type=kind)
    parser.add_argument("--riflex", action="store_true",
                        help="RIFLEx: lower the intrinsic temporal RoPE frequency past the model's reference length "
                             "(Wan, HunyuanVideo)")
    parser.add_argument("--cpu-offload", action="store_true", help="diffusers' model CPU offload (CUDA only)")
    parser.add_argument("--fps", type=int, default=16)
    parser.add_argument("--output", default="lvsa_video.mp4", help="mp4 path (default lvsa_video.mp4)")


def check_video_writer() -> None:
    """Raise RuntimeError unless imageio and imageio-ffmpeg (needed by diffusers' `export_to_video`) import."""
    missing = [m for m in ("imageio", "imageio_ffmpeg") if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"generate: writing the mp4 needs {' and '.join(missing)}; install them with "
                           "pip install \"lvsa_kernels[video]\" (or pip install imageio imageio-ffmpeg)")


def check_prompt_cleaner(pipe: Any) -> None:
    """Raise RuntimeError when ``pipe`` cleans prompts with ftfy without checking that it is installed (diffusers
    0.42's Wan VACE and SkyReels-V2 pipelines: a NameError inside the pipeline call otherwise) and it is missing."""
    module = sys.modules.get(type(pipe).__module__)
    clean = getattr(module, "basic_clean", None)
    if clean is None or importlib.util.find_spec("ftfy") is not None:
        return
    try:
        source = inspect.getsource(clean)
    except (OSError, TypeError):
        return
    if "ftfy." in source and "is_ftfy_available" not in source:
        raise RuntimeError(f"generate: {type(pipe).__name__} cleans the prompt with ftfy, which is not installed; "
                           "install it with pip install \"lvsa_kernels[video]\" (or pip install ftfy)")


def load_pipeline(path: str, dtype: torch.dtype) -> Any:
    """``DiffusionPipeline.from_pretrained(path, local_files_only=True)``; raises ValueError naming ``path``
    when it is not a diffusers pipeline folder."""
    from diffusers import DiffusionPipeline

    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ValueError(f"pipeline: {path!r} is not a diffusers pipeline folder (no model_index.json in it); "
                         "give the local folder written by save_pretrained or a downloaded snapshot "
                         "(generate never downloads)")
    return DiffusionPipeline.from_pretrained(path, dtype=dtype, local_files_only=True)


def _knobs(args: argparse.Namespace, table: Dict[str, type]) -> Dict[str, Any]:
    return {name: getattr(args, name) for name in table if getattr(args, name) is not None}


def check_knobs(args: argparse.Namespace) -> None:
    """Raise ValueError when pattern knobs or ``--riflex`` do not fit ``--attention`` (before any loading)."""
    lvsa, svoo = _knobs(args, _LVSA_KNOBS), _knobs(args, _SVOO_KNOBS)
    if args.attention == "dense" and (lvsa or svoo or args.riflex):
        raise ValueError("--attention dense: pattern knobs and --riflex apply to lvsa / svoo only")
    if args.attention == "svoo" and lvsa:
        raise ValueError(f"--attention svoo: LVSA knobs {sorted(lvsa)} do not apply to SVOO")
    if args.attention == "lvsa" and svoo:
        raise ValueError(f"--attention lvsa: SVOO knobs {sorted(svoo)} need --attention svoo")


def enable_attention(pipe: Any, args: argparse.Namespace) -> Optional[Any]:
    """Install the requested attention on ``pipe``; returns the `LVSAHandle` (None for dense)."""
    from ..diffusers import enable_lvsa
    from ..svoo_attention import SVOOPattern

    check_knobs(args)
    if args.attention == "dense":
        return None
    if args.attention == "svoo":
        pattern = SVOOPattern(**_knobs(args, _SVOO_KNOBS))
        return enable_lvsa(pipe, pattern=pattern, backend=args.backend, riflex=args.riflex)
    return enable_lvsa(pipe, backend=args.backend, riflex=args.riflex, **_knobs(args, _LVSA_KNOBS))


def call_kwargs(pipe: Any, args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    """The pipeline call's keyword arguments from the options given; raises ValueError for an option the
    pipeline does not take. A pipeline with a ``guider`` (HunyuanVideo 1.5) gets ``--guidance`` there."""
    import torch

    accepted = inspect.signature(type(pipe).__call__).parameters
    wanted = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "num_frames": args.frames,
              "height": args.height, "width": args.width, "num_inference_steps": args.steps}
    kwargs = {k: v for k, v in wanted.items() if v is not None}
    if args.guidance is not None:
        if "guidance_scale" in accepted:
            kwargs["guidance_scale"] = args.guidance
        elif hasattr(getattr(pipe, "guider", None), "guidance_scale"):
            pipe.guider.guidance_scale = args.guidance
        else:
            raise ValueError(f"--guidance: {type(pipe).__name__} takes no guidance scale")
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown:
        raise ValueError(f"{type(pipe).__name__} does not take {unknown}; drop those options")
    kwargs["generator"] = torch.Generator(device="cpu" if args.cpu_offload else device).manual_seed(args.seed)
    kwargs["output_type"] = "np"
    return kwargs


def density_summary(handle: Optional[Any]) -> str:
    """Layout density of the run: mean, min and max over the planned layouts (LVSA) or cached SVOO plans."""
    if handle is None:
        return "1.0000 (dense)"
    densities = handle.runtime.plan_densities()
    if not densities:
        return "n/a (no sparse attention call ran)"
    mean = sum(densities) / len(densities)
    return f"{mean:.4f} mean over {len(densities)} layouts (min {min(densities):.4f}, max {max(densities):.4f})"


def run(args: argparse.Namespace) -> int:
    import torch

    from diffusers.utils import export_to_video

    check_video_writer()
    check_knobs(args)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if (args.cpu_offload or device.type == "cuda") and not torch.cuda.is_available():
        raise RuntimeError("generate: --device cuda / --cpu-offload need CUDA, which torch does not see here")
    dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if args.dtype == "auto" \
        else getattr(torch, args.dtype)
    pipe = load_pipeline(args.pipeline, dtype)
    check_prompt_cleaner(pipe)
    if args.cpu_offload:
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
    kwargs = call_kwargs(pipe, args, device)
    handle = enable_attention(pipe, args)
    pipe.set_progress_bar_config(disable=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    frames = pipe(**kwargs).frames[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    path = export_to_video(list(frames), args.output, fps=args.fps)
    if handle is None:
        backend = "pipeline's own (dense)"
    else:
        backend = getattr(handle.runtime, "chosen_backend", None) or (
            "auto (resolved per SVOO call)" if args.backend == "auto" else args.backend)
    print(f"model: {type(pipe.transformer).__name__}  attention: {args.attention}  frames: {len(frames)}  "
          f"dtype: {str(dtype).replace('torch.', '')}  device: {device.type}")
    print(f"wall time: {wall:.2f} s  layout density: {density_summary(handle)}  backend: {backend}")
    print(f"video: {path}")
    return 0
