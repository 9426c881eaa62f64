"""`generate`'s inputs: every bad command line is a usage error (exit 2) naming the option, raised before any model
loads (the folders below hold only a model_index.json), with no traceback; conditioning inputs (--image,
--control-video, --reference-image, --ar-step) reach the pipeline's own arguments; `tiny-pipeline` writes a folder
that `generate` runs end to end on CPU."""
import json
import re

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("imageio_ffmpeg")
import imageio  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import lvsa_kernels.diffusers.runtime as runtime_module  # noqa: E402
from lvsa_kernels.__main__ import main  # noqa: E402

FAST = ["--prompt", "a cat runs on the beach", "--frames", "17", "--height", "32", "--width", "32", "--steps", "2",
        "--backend", "reference", "--reference-frames", "2", "--window", "1", "--key-frame-interval", "0"]


def index_only(folder, pipeline, transformer=None):
    """A folder holding only a model_index.json naming ``pipeline`` with a ``transformer`` (never loadable: any
    check that passes would fail later at loading)."""
    folder.mkdir()
    spec = {"_class_name": pipeline, "_diffusers_version": "0.42.1"}
    if transformer is not None:
        spec["transformer"] = ["diffusers", transformer]
    (folder / "model_index.json").write_text(json.dumps(spec))
    return str(folder)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Index-only folders and media files shared by the bad-input cases."""
    root = tmp_path_factory.mktemp("inputs")
    out = {"wan": index_only(root / "wan", "WanPipeline", "WanTransformer3DModel"),
           "vace": index_only(root / "vace", "WanVACEPipeline", "WanVACETransformer3DModel"),
           "cog": index_only(root / "cog", "CogVideoXPipeline", "CogVideoXTransformer3DModel"),
           "ltx": index_only(root / "ltx", "LTXPipeline", "LTXVideoTransformer3DModel"),
           "latte": index_only(root / "latte", "LattePipeline", "LatteTransformer3DModel"),
           "sd": index_only(root / "sd", "WanPipeline", "UNet2DConditionModel"),
           "unet": index_only(root / "unet", "StableDiffusionPipeline"),
           "animate": index_only(root / "animate", "WanAnimatePipeline", "WanAnimateTransformer3DModel"),
           "empty": str(root)}
    (root / "broken").mkdir()
    (root / "broken" / "model_index.json").write_text("{not json")
    out["broken"] = str(root / "broken")
    (root / "not_an_image.png").write_text("hello")
    out["not_an_image"] = str(root / "not_an_image.png")
    out["image"] = str(root / "frame.png")
    imageio.imwrite(out["image"], np.zeros((32, 32, 3), dtype=np.uint8))
    out["out"] = str(root / "out.mp4")
    return out


BAD = [  # (argv with {placeholders} from `files`, option named in the error)
    (["{empty}"], "pipeline"),
    (["{broken}"], "pipeline"),
    (["{wan}", "--frames", "0"], "--frames"),
    (["{wan}", "--height", "-32"], "--height"),
    (["{wan}", "--steps", "two"], "--steps"),
    (["{wan}", "--guidance", "-1"], "--guidance"),
    (["{wan}", "--seed", "-1"], "--seed"),
    (["{wan}", "--fps", "0"], "--fps"),
    (["{wan}", "--ar-step", "-1"], "--ar-step"),
    (["{wan}", "--window", "-1"], "--window"),
    (["{wan}", "--reference-frames", "0"], "--reference-frames"),
    (["{wan}", "--sparsity-scale", "0"], "--sparsity-scale"),
    (["{wan}", "--attention", "svoo", "--top-p", "1.5"], "--top-p"),
    (["{wan}", "--attention", "svoo", "--q-clusters", "0"], "--q-clusters"),
    (["{wan}", "--attention", "sparse"], "--attention"),
    (["{wan}", "--dtype", "fp8"], "--dtype"),
    (["{wan}", "--attention", "dense", "--riflex"], "--attention dense"),
    (["{wan}", "--top-p", "0.5"], "--attention lvsa"),
    (["{wan}", "--attention", "svoo", "--window", "2"], "--attention svoo"),
    (["{wan}", "--output", "video.avi"], "--output"),
    (["{wan}", "--output", "/no/such/folder/v.mp4"], "--output"),
    (["{wan}", "--output", "{empty}"], "--output"),
    (["{wan}", "--image", "{image}"], "--image"),                       # text-to-video takes no image
    (["{wan}", "--control-video", "{out}"], "--control-video"),
    (["{wan}", "--ar-step", "2"], "--ar-step"),
    (["{animate}", "--frames", "17"], "--frames"),                      # the pose video sets the length
    (["{vace}", "--control-video", "/no/such.mp4"], "--control-video"),
    (["{vace}", "--control-video", "{not_an_image}"], "--control-video"),
    (["{vace}", "--reference-image", "{not_an_image}"], "--reference-image"),
    (["{vace}", "--reference-image", "{image}", "--reference-image", "/no/such.png"], "--reference-image"),
    (["{cog}", "--attention", "svoo"], "--attention svoo"),              # text first: no SVOO
    (["{ltx}", "--riflex"], "--riflex"),
    (["{latte}"], "--attention lvsa"),                                  # refused, with the reason
    (["{sd}"], "--attention lvsa"),                                     # not a video transformer
    (["{unet}"], "--attention lvsa"),                                   # no transformer at all
]
if not torch.cuda.is_available():
    BAD += [(["{wan}", "--cpu-offload"], "--cpu-offload"), (["{wan}", "--device", "cuda"], "--device cuda")]


@pytest.mark.parametrize("argv, option", BAD, ids=[" ".join(a[1:]) or a[0] for a, _ in BAD])
def test_bad_input_is_a_usage_error_before_loading(argv, option, files, capsys, monkeypatch):
    import diffusers

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained",
                        lambda *a, **k: pytest.fail("a model loaded before the bad input was reported"))
    args = [a.format(**files) for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(["generate", *args[:1], "--prompt", "a cat", *args[1:]])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("python -m lvsa_kernels generate: error: argument") and option in last, last


def test_refusal_names_the_reason(files, capsys):
    with pytest.raises(SystemExit):
        main(["generate", files["latte"], "--prompt", "a cat"])
    assert "LatteTransformer3DModel is not supported: Latte factorises attention" in capsys.readouterr().err


def frames_in(path):
    with imageio.get_reader(path) as reader:
        return reader.count_frames()


@pytest.fixture
def pipeline_calls(monkeypatch):
    """The keyword arguments of every pipeline call `generate` makes (the call itself runs)."""
    from diffusers import DiffusionPipeline

    calls = []
    real = DiffusionPipeline.from_pretrained.__func__

    def load(cls, *args, **kwargs):
        pipe = real(cls, *args, **kwargs)
        call = type(pipe).__call__
        monkeypatch.setattr(type(pipe), "__call__", lambda self, **kw: calls.append(kw) or call(self, **kw))
        return pipe

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(load))
    return calls


def test_tiny_pipeline_then_generate_end_to_end(tmp_path, capsys):
    folder = str(tmp_path / "tiny_wan")
    assert main(["tiny-pipeline", folder]) == 0
    hint = capsys.readouterr().out
    assert f"python -m lvsa_kernels generate {folder} " in hint
    video = tmp_path / "tiny.mp4"
    assert main(["generate", folder, *FAST, "--output", str(video)]) == 0
    assert frames_in(str(video)) == 17
    assert float(re.search(r"layout density: (\S+)", capsys.readouterr().out).group(1)) < 1.0


def test_tiny_pipeline_refuses_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "x").write_text("")
    with pytest.raises(SystemExit) as exc:
        main(["tiny-pipeline", str(tmp_path)])
    assert exc.value.code == 2 and "exists and is not an empty folder" in capsys.readouterr().err


def test_image_to_video_gets_the_image(tmp_path, files, pipeline_calls):
    folder = str(tmp_path / "i2v")
    assert main(["tiny-pipeline", folder, "--model", "wan_i2v"]) == 0
    video = tmp_path / "i2v.mp4"
    assert main(["generate", folder, *FAST, "--image", files["image"], "--output", str(video)]) == 0
    assert frames_in(str(video)) == 17
    (kwargs,) = pipeline_calls
    assert kwargs["image"].size == (32, 32) and kwargs["image"].mode == "RGB"


def test_vace_gets_the_control_video_and_reference_images(tmp_path, files, pipeline_calls, monkeypatch):
    pytest.importorskip("ftfy")
    folder = str(tmp_path / "vace")
    assert main(["tiny-pipeline", folder, "--model", "wan_vace"]) == 0
    control = str(tmp_path / "control.mp4")
    imageio.mimwrite(control, [np.full((32, 32, 3), 15 * i, dtype=np.uint8) for i in range(17)], fps=8)
    offsets = []
    real = runtime_module.block_sparse_attn
    monkeypatch.setattr(runtime_module, "block_sparse_attn",
                        lambda q, k, v, layout, **kw: offsets.append(layout.meta) or real(q, k, v, layout, **kw))
    video = tmp_path / "vace.mp4"
    assert main(["generate", folder, *FAST, "--control-video", control, "--reference-image", files["image"],
                 "--output", str(video)]) == 0
    assert frames_in(str(video)) == 17
    (kwargs,) = pipeline_calls
    assert len(kwargs["video"]) == 17 and len(kwargs["reference_images"]) == 1
    assert {meta["frames"] for meta in offsets} == {5 + 1}  # the reference image is one more latent frame, first


def test_skyreels_diffusion_forcing_gets_ar_step(tmp_path, pipeline_calls):
    pytest.importorskip("ftfy")
    from tiny_pipelines import save_tiny_skyreels_v2

    folder = save_tiny_skyreels_v2(str(tmp_path / "df"), diffusion_forcing=True)
    video = tmp_path / "df.mp4"
    assert main(["generate", folder, *FAST, "--frames", "21", "--ar-step", "1", "--output", str(video)]) == 0
    assert frames_in(str(video)) == 21
    (kwargs,) = pipeline_calls
    assert kwargs["ar_step"] == 1


def test_wan_animate_gets_the_image_pose_and_face_videos(tmp_path, files, pipeline_calls, monkeypatch):
    from tiny_pipelines import save_tiny_wan_animate

    folder = save_tiny_wan_animate(str(tmp_path / "animate"))
    pose, face = str(tmp_path / "pose.mp4"), str(tmp_path / "face.mp4")
    imageio.mimwrite(pose, [np.full((32, 32, 3), 15 * i, dtype=np.uint8) for i in range(17)], fps=8)
    imageio.mimwrite(face, [np.full((16, 16, 3), 15 * i, dtype=np.uint8) for i in range(17)], fps=8)
    layouts = []
    real = runtime_module.block_sparse_attn
    monkeypatch.setattr(runtime_module, "block_sparse_attn",
                        lambda q, k, v, layout, **kw: layouts.append(layout) or real(q, k, v, layout, **kw))
    fast = [a for a in FAST if a not in ("--frames", "17")]  # the pose video sets the length
    video = tmp_path / "animate.mp4"
    assert main(["generate", folder, *fast, "--image", files["image"], "--pose-video", pose, "--face-video", face,
                 "--output", str(video)]) == 0
    assert frames_in(str(video)) == 17
    (kwargs,) = pipeline_calls
    assert len(kwargs["pose_video"]) == 17 and len(kwargs["face_video"]) == 17 and kwargs["image"].size == (32, 32)
    assert layouts and max(layout.density for layout in layouts) < 1.0
