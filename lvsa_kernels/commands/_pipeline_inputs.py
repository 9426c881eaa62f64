"""`generate`'s pipeline inputs, checked before any model loads: the pipeline folder's classes (read from its
``model_index.json``), which call arguments that pipeline class takes, and the conditioning media (image,
control / pose / face videos, reference images) read from local files. Every problem is a `UsageError`
naming the option, the value and what was expected (exit 2).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from ._args import UsageError

__all__ = ["PipelineFolder", "read_pipeline_folder", "MEDIA_OPTIONS", "add_media_arguments", "media_inputs",
           "check_output_path"]


@dataclass(frozen=True)
class PipelineFolder:
    """What ``model_index.json`` says about a local diffusers pipeline folder.

    Attributes:
        path: the folder.
        pipeline_class: the pipeline class name (``_class_name``).
        transformer_class: the class name of its ``transformer`` component, or None.
        components: the component names it lists (``transformer``, ``guider``, ...).
    """

    path: str
    pipeline_class: str
    transformer_class: Optional[str]
    components: Tuple[str, ...]

    def call_parameters(self) -> Optional[Dict[str, inspect.Parameter]]:
        """The parameters of the pipeline class's ``__call__`` (None when diffusers has no class of that name)."""
        import diffusers

        cls = getattr(diffusers, self.pipeline_class, None)
        return None if cls is None else dict(inspect.signature(cls.__call__).parameters)


def read_pipeline_folder(path: str) -> PipelineFolder:
    """The `PipelineFolder` at ``path``; raises `UsageError` when it is not a diffusers pipeline folder."""
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise UsageError(f"argument pipeline: {path!r} is not a diffusers pipeline folder (no model_index.json in "
                         "it); give the local folder written by save_pretrained or a downloaded snapshot (generate "
                         "never downloads), or make one with 'python -m lvsa_kernels tiny-pipeline'")
    try:
        with open(index, encoding="utf-8") as f:
            spec = json.load(f)
        name = spec["_class_name"]
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"argument pipeline: {index!r} is not a readable model_index.json ({exc})") from None
    transformer = spec.get("transformer")
    transformer_class = transformer[1] if isinstance(transformer, list) and len(transformer) == 2 else None
    components = tuple(k for k, v in spec.items() if not k.startswith("_") and isinstance(v, list))
    return PipelineFolder(path, name, transformer_class, components)


def _one_line(exc: Exception) -> str:
    """An exception's message on one line (usage errors end with one line)."""
    return " ".join(str(exc).split())


def _image(option: str, path: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise UsageError(f"argument {option}: no such image file, got {path!r}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise UsageError(f"argument {option}: cannot read {path!r} as an image ({_one_line(exc)})") from None


def _video(option: str, path: str) -> List[Any]:
    """The frames of a local video file as RGB PIL images (diffusers' `load_video`, never a URL)."""
    from diffusers.utils import load_video

    if not os.path.isfile(path):
        raise UsageError(f"argument {option}: no such video file, got {path!r}")
    try:
        frames = load_video(path)
    except Exception as exc:  # imageio / PIL raise many types for unreadable files
        raise UsageError(f"argument {option}: cannot read {path!r} as a video ({type(exc).__name__}: "
                         f"{_one_line(exc)})") from None
    if not frames:
        raise UsageError(f"argument {option}: {path!r} has no frames")
    return frames


@dataclass(frozen=True)
class MediaOption:
    """A conditioning input: the command-line option, the pipeline parameters it can fill (the first one the
    pipeline takes), how a file becomes the value, and its help text."""

    option: str
    parameters: Tuple[str, ...]
    load: Callable[[str, str], Any]
    help: str
    repeated: bool = False


MEDIA_OPTIONS = (
    MediaOption("--image", ("image",), _image, "first-frame image for image-to-video pipelines (pipeline argument "
                "image)"),
    MediaOption("--last-image", ("last_image",), _image, "last-frame image (SkyReels-V2 diffusion-forcing I2V)"),
    MediaOption("--control-video", ("video", "control_video"), _video,
                "control / source video (Wan VACE and SkyReels-V2 V2V: video; EasyAnimate and CogVideoX-Fun "
                "control: control_video)"),
    MediaOption("--reference-image", ("reference_images",), _image,
                "reference image for Wan VACE (repeat for several; pipeline argument reference_images)", True),
    MediaOption("--pose-video", ("pose_video",), _video, "pose video (Wan Animate)"),
    MediaOption("--face-video", ("face_video",), _video, "face video (Wan Animate)"),
)


def add_media_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("conditioning inputs (local files; passed as the pipeline's own arguments)")
    for media in MEDIA_OPTIONS:
        group.add_argument(media.option, action="append" if media.repeated else "store", metavar="PATH",
                           help=media.help)


def media_inputs(args: argparse.Namespace, folder: PipelineFolder) -> Dict[str, Any]:
    """The pipeline keyword arguments of the conditioning options given, read from their files; raises
    `UsageError` for an option ``folder``'s pipeline does not take or a file that cannot be read."""
    accepted = folder.call_parameters()
    kwargs: Dict[str, Any] = {}
    for media in MEDIA_OPTIONS:
        value = getattr(args, media.option[2:].replace("-", "_"))
        if value is None:
            continue
        names = [p for p in media.parameters if accepted is None or p in accepted]
        if not names:
            raise UsageError(f"argument {media.option}: {folder.pipeline_class} takes none of "
                             f"{list(media.parameters)}, got {value!r}")
        paths = value if media.repeated else [value]
        loaded = [media.load(media.option, path) for path in paths]
        kwargs[names[0]] = loaded if media.repeated else loaded[0]
    return kwargs


def check_output_path(path: str) -> None:
    """Raise `UsageError` unless ``path`` is an ``.mp4`` file in an existing folder."""
    if not path.lower().endswith(".mp4"):
        raise UsageError(f"argument --output: expected an .mp4 path, got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"argument --output: folder {folder!r} does not exist, got {path!r}")
    if os.path.isdir(path):
        raise UsageError(f"argument --output: {path!r} is a folder; give a file path")
