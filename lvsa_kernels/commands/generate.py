"""Generate a video with a local diffusers pipeline folder and LVSA (or SVOO, or dense attention for
comparison): checks every option against the folder's pipeline class and reads the conditioning files
(--image, --control-video, --reference-image, ...) before any model loads, then loads the pipeline without
downloading anything, installs the sparse attention with the model's defaults (`enable_lvsa`), runs the
pipeline with its progress bar, writes an mp4 and prints the wall time, the layout density and the backend.
Try it on CPU with a tiny random pipeline: ``python -m lvsa_kernels tiny-pipeline tiny_wan`` first.

Writing the mp4 needs imageio and imageio-ffmpeg, and the Wan VACE / SkyReels-V2 pipelines need ftfy:
``pip install "lvsa_kernels[video]"``.
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import sys
import time
from typing import TYPE_CHECKING, Any, Dict, Optional

from ._args import NON_NEGATIVE, POSITIVE, UsageError, float_in
from ._pipeline_inputs import PipelineFolder, add_media_arguments, check_output_path, media_inputs, read_pipeline_folder

if TYPE_CHECKING:  # torch loads inside the functions, so --help stays light
    import torch

HELP = "generate a video with a local diffusers pipeline folder and LVSA / SVOO / dense attention"

_DTYPES = ("float16", "bfloat16", "float32")
_LVSA_KNOBS = {"window": NON_NEGATIVE, "n_first": NON_NEGATIVE, "reference_frames": POSITIVE,
               "sparsity_scale": float_in(0.0), "key_frame_interval": NON_NEGATIVE}
_SVOO_KNOBS = {"top_p": float_in(0.0, 1.0), "q_clusters": POSITIVE, "k_clusters": POSITIVE,
               "warmup_steps": NON_NEGATIVE}
# option dest -> the pipeline __call__ parameter it fills
_CALL_OPTIONS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "frames": "num_frames",
                 "height": "height", "width": "width", "steps": "num_inference_steps", "ar_step": "ar_step"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", help="local diffusers pipeline folder (holds model_index.json)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt")
    parser.add_argument("--frames", type=POSITIVE, help="video frames (default: the pipeline's)")
    parser.add_argument("--height", type=POSITIVE, help="pixels (default: the pipeline's)")
    parser.add_argument("--width", type=POSITIVE, help="pixels (default: the pipeline's)")
    parser.add_argument("--steps", type=POSITIVE, help="denoising steps (default: the pipeline's)")
    parser.add_argument("--guidance", type=float_in(0.0, low_open=False),
                        help="classifier-free guidance scale (default: the pipeline's)")
    parser.add_argument("--ar-step", type=NON_NEGATIVE,
                        help="SkyReels-V2 diffusion forcing: asynchronous step offset between frame blocks "
                             "(default: the pipeline's, 0 = synchronous)")
    add_media_arguments(parser)
    parser.add_argument("--seed", type=NON_NEGATIVE, default=0)
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
    parser.add_argument("--fps", type=POSITIVE, default=16)
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


def load_pipeline(folder: PipelineFolder, dtype: torch.dtype) -> Any:
    """``DiffusionPipeline.from_pretrained(folder.path, local_files_only=True)``."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder.path, dtype=dtype, local_files_only=True)


def _knobs(args: argparse.Namespace, table: Dict[str, type]) -> Dict[str, Any]:
    return {name: getattr(args, name) for name in table if getattr(args, name) is not None}


def check_knobs(args: argparse.Namespace) -> None:
    """Raise `UsageError` when pattern knobs or ``--riflex`` do not fit ``--attention`` (before any loading)."""
    lvsa, svoo = _knobs(args, _LVSA_KNOBS), _knobs(args, _SVOO_KNOBS)
    if args.attention == "dense" and (lvsa or svoo or args.riflex):
        raise UsageError("argument --attention dense: pattern knobs and --riflex apply to lvsa / svoo only")
    if args.attention == "svoo" and lvsa:
        raise UsageError(f"argument --attention svoo: LVSA knobs {sorted(lvsa)} do not apply to SVOO")
    if args.attention == "lvsa" and svoo:
        raise UsageError(f"argument --attention lvsa: SVOO knobs {sorted(svoo)} need --attention svoo")


def check_attention_fits(folder: PipelineFolder, args: argparse.Namespace) -> None:
    """Raise `UsageError` when ``--attention`` / ``--riflex`` cannot run on the folder's transformer (not
    supported, refused with a reason, no SVOO, no RIFLEx), before any loading."""
    from ..diffusers.integration import SUPPORTED_MODELS, UNSUPPORTED_MODELS

    if args.attention == "dense":
        return
    name = folder.transformer_class
    if name is None:
        raise UsageError(f"argument --attention {args.attention}: {folder.pipeline_class} has no transformer component "
                         "(model_index.json); use --attention dense")
    spec = next((s for s in SUPPORTED_MODELS if s.preset.diffusers_class == name), None)
    if spec is None:
        reasons = {cls.__name__: reason for cls, reason in UNSUPPORTED_MODELS.items()}
        why = f"not supported: {reasons[name]}" if name in reasons else "not a transformer LVSA supports"
        raise UsageError(f"argument --attention {args.attention}: the pipeline's transformer {name} is {why}; "
                         "use --attention dense")
    if args.attention == "svoo" and not spec.svoo:
        raise UsageError(f"argument --attention svoo: SVOO does not run on {spec.name} ({name}); use lvsa")
    if args.riflex and spec.rope is None:
        raise UsageError(f"argument --riflex: RIFLEx does not run on {spec.name} ({name}); only on Wan and "
                         "HunyuanVideo models")


def check_device(args: argparse.Namespace) -> None:
    """Raise `UsageError` when ``--device cuda`` or ``--cpu-offload`` is asked for without CUDA."""
    import torch

    if (args.cpu_offload or args.device == "cuda") and not torch.cuda.is_available():
        option = "--cpu-offload" if args.cpu_offload else "--device cuda"
        raise UsageError(f"argument {option}: needs CUDA, which torch does not see here")


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


def call_kwargs(folder: PipelineFolder, args: argparse.Namespace) -> Dict[str, Any]:
    """The pipeline call's keyword arguments from the options given (conditioning files read), checked against
    the folder's pipeline class before it loads: raises `UsageError` naming an option it does not take.
    ``--guidance`` goes to ``guidance_scale``, or to the ``guider`` component (HunyuanVideo 1.5) in `run`."""
    accepted = folder.call_parameters()
    kwargs = {}
    for dest, parameter in _CALL_OPTIONS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if accepted is not None and parameter not in accepted:
            option = "--" + dest.replace("_", "-")
            raise UsageError(f"argument {option}: {folder.pipeline_class} takes no {parameter}, got {value!r}")
        kwargs[parameter] = value
    if args.guidance is not None:
        if accepted is None or "guidance_scale" in accepted:
            kwargs["guidance_scale"] = args.guidance
        elif "guider" not in folder.components:
            raise UsageError(f"argument --guidance: {folder.pipeline_class} takes no guidance scale, "
                             f"got {args.guidance}")
    kwargs.update(media_inputs(args, folder))
    kwargs["output_type"] = "np"
    return kwargs


def seeded_generator(args: argparse.Namespace, device: torch.device) -> torch.Generator:
    """The pipeline call's ``generator``: ``--seed`` on ``device`` (on the CPU under ``--cpu-offload``)."""
    import torch

    return torch.Generator(device="cpu" if args.cpu_offload else device).manual_seed(args.seed)


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
    check_output_path(args.output)
    check_device(args)
    folder = read_pipeline_folder(args.pipeline)
    check_attention_fits(folder, args)
    kwargs = call_kwargs(folder, args)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if args.dtype == "auto" \
        else getattr(torch, args.dtype)
    pipe = load_pipeline(folder, dtype)
    check_prompt_cleaner(pipe)
    if args.cpu_offload:
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
    if args.guidance is not None and "guidance_scale" not in kwargs:
        pipe.guider.guidance_scale = args.guidance
    kwargs["generator"] = seeded_generator(args, device)
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
