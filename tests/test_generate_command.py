"""`python -m lvsa_kernels generate` end to end on CPU with tiny random pipelines saved by ``save_pretrained``
(Wan, and HunyuanVideo 1.5 for joint attention): mp4 written, density and backend printed, clear errors."""
import re

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("imageio_ffmpeg")
import imageio  # noqa: E402
import torch  # noqa: E402

import lvsa_kernels.diffusers.runtime as runtime_module  # noqa: E402
from lvsa_kernels.__main__ import main  # noqa: E402
from lvsa_kernels.commands import generate  # noqa: E402
from lvsa_kernels.diffusers.tiny_pipeline import save_tiny_wan  # noqa: E402

from tiny_pipelines import save_tiny_hunyuan15  # noqa: E402

SMALL = ["--prompt", "a cat runs on the beach", "--negative-prompt", "blurry", "--frames", "17", "--height", "32",
         "--width", "32", "--steps", "2", "--guidance", "5", "--backend", "reference"]
SPARSE = ["--reference-frames", "2", "--window", "1", "--key-frame-interval", "0"]


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return save_tiny_wan(str(tmp_path_factory.mktemp("tiny_wan")))


def frames_in(path):
    with imageio.get_reader(path) as reader:
        return reader.count_frames()


def printed(capsys):
    out = capsys.readouterr().out
    density = re.search(r"layout density: (\S+)", out).group(1)
    backend = re.search(r"backend: (.+)", out).group(1)
    assert re.search(r"wall time: \d+\.\d+ s", out), out
    return float(density), backend


@pytest.mark.parametrize("extra", [
    ["--riflex"],
    pytest.param(["--cpu-offload"], marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                              reason="diffusers' model CPU offload needs CUDA")),
])
def test_wan_lvsa_writes_mp4_and_reports(wan_dir, tmp_path, capsys, extra):
    video = tmp_path / "wan.mp4"
    assert main(["generate", wan_dir, *SMALL, *SPARSE, *extra, "--output", str(video)]) == 0
    assert frames_in(str(video)) == 17
    density, backend = printed(capsys)
    assert density < 1.0 and backend == "reference"


def test_wan_dense_for_comparison(wan_dir, tmp_path, capsys):
    video = tmp_path / "dense.mp4"
    assert main(["generate", wan_dir, *SMALL, "--attention", "dense", "--output", str(video)]) == 0
    assert frames_in(str(video)) == 17
    assert printed(capsys) == (1.0, "pipeline's own (dense)")


def test_wan_svoo(wan_dir, tmp_path, capsys):
    video = tmp_path / "svoo.mp4"
    assert main(["generate", wan_dir, *SMALL, "--attention", "svoo", "--q-clusters", "4", "--k-clusters", "4",
                 "--warmup-steps", "0", "--top-p", "0.5", "--output", str(video)]) == 0
    assert frames_in(str(video)) == 17
    density, backend = printed(capsys)
    assert density < 1.0 and backend == "reference"


def test_hunyuan15_joint_attention_pipeline(tmp_path, capsys, monkeypatch):
    offsets = []
    real = runtime_module.block_sparse_attn
    monkeypatch.setattr(runtime_module, "block_sparse_attn",
                        lambda q, k, v, layout, **kw: offsets.append(layout.meta["offset"]) or real(q, k, v, layout, **kw))
    folder = save_tiny_hunyuan15(str(tmp_path / "tiny_hv15"))
    video = tmp_path / "hv.mp4"
    # --guidance goes to the guider; 7 latent frames, periodic keyframes every 3 frames (the offset shows the step)
    assert main(["generate", folder, *SMALL, *SPARSE, "--frames", "25", "--key-frame-interval", "3",
                 "--output", str(video)]) == 0
    assert frames_in(str(video)) == 25
    density, backend = printed(capsys)
    assert density < 1.0 and backend == "reference"
    per_step = len(offsets) // 2
    assert per_step > 0 and offsets == [0] * per_step + [1] * per_step  # one rotation step per denoising step


def test_missing_video_writer_is_a_clear_error(monkeypatch, tmp_path):
    real = generate.importlib.util.find_spec
    monkeypatch.setattr(generate.importlib.util, "find_spec",
                        lambda name, *a: None if name == "imageio_ffmpeg" else real(name, *a))
    with pytest.raises(RuntimeError, match=r"imageio_ffmpeg.*lvsa_kernels\[video\]"):
        main(["generate", str(tmp_path), "--prompt", "a cat"])


def test_missing_ftfy_is_a_clear_error_for_pipelines_that_need_it(monkeypatch):
    from diffusers import SkyReelsV2Pipeline, WanPipeline, WanVACEPipeline

    real = generate.importlib.util.find_spec
    monkeypatch.setattr(generate.importlib.util, "find_spec",
                        lambda name, *a: None if name == "ftfy" else real(name, *a))
    for cls in (WanVACEPipeline, SkyReelsV2Pipeline):  # their prompt cleaning calls ftfy unconditionally
        with pytest.raises(RuntimeError, match=f"{cls.__name__} cleans the prompt with ftfy.*pip install"):
            generate.check_prompt_cleaner(object.__new__(cls))
    generate.check_prompt_cleaner(object.__new__(WanPipeline))  # checks is_ftfy_available() itself
