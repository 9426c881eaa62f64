"""The models whose tiny pipeline is cheap to build (Wan VACE, SkyReels-V2, HunyuanVideo 1.0, CogVideoX, LTX-Video,
LTX-2, Mochi, Motif-Video) through their own diffusers pipeline and ``python -m lvsa_kernels generate`` on CPU: a tiny
random-weight pipeline (locally built tokenizers and text encoders, no download) saved with
``save_pretrained``, loaded by ``generate``, run for 2 denoising steps with a sparse LVSA pattern; the mp4 has
the requested frames, the layouts are sparse, and the rotation offset advances once per step through the
pipeline (every attention call of step ``i`` uses offset ``i``)."""
import re

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("imageio_ffmpeg")
pytest.importorskip("ftfy")  # Wan VACE and SkyReels-V2 clean prompts with ftfy
import imageio  # noqa: E402

import lvsa_kernels.diffusers.runtime as runtime_module  # noqa: E402
from lvsa_kernels.__main__ import main  # noqa: E402
from lvsa_kernels.diffusers.tiny_pipeline import save_tiny_wan_vace  # noqa: E402

import tiny_pipelines  # noqa: E402

STEPS = 2
ARGS = ["--prompt", "a cat runs on the beach", "--negative-prompt", "blurry", "--height", "32", "--width", "32",
        "--steps", str(STEPS), "--backend", "reference", "--reference-frames", "2", "--window", "1",
        "--key-frame-interval", "3"]

# model: (pipeline builder, video frames, latent frames); the tiny VAEs compress time 4x (Mochi's 6x): 21 frames =
# 6 latent frames (a multiple of the diffusion-forcing block of 2), CogVideoX 25 = 7 (its VAE decodes an even latent
# count to 4T frames), Mochi 31 = 6
PIPELINES = {
    "wan_vace": (save_tiny_wan_vace, 21, 6),
    "skyreels_v2_t2v": (lambda path: tiny_pipelines.save_tiny_skyreels_v2(path, diffusion_forcing=False), 21, 6),
    "skyreels_v2_diffusion_forcing": (lambda path: tiny_pipelines.save_tiny_skyreels_v2(path, diffusion_forcing=True),
                                      21, 6),
    "hunyuan_video": (tiny_pipelines.save_tiny_hunyuan_video, 21, 6),
    "cogvideox": (tiny_pipelines.save_tiny_cogvideox, 25, 7),
    "ltx_video": (tiny_pipelines.save_tiny_ltx_video, 21, 6),
    "ltx2": (tiny_pipelines.save_tiny_ltx2, 21, 6),
    "mochi": (tiny_pipelines.save_tiny_mochi, 31, 6),
    "motif_video": (tiny_pipelines.save_tiny_motif_video, 21, 6),
}


@pytest.fixture
def layouts(monkeypatch):
    """The layout of every LVSA attention call, in call order."""
    seen = []
    real = runtime_module.block_sparse_attn

    def spy(q, k, v, layout, **kw):
        seen.append(layout)
        return real(q, k, v, layout, **kw)

    monkeypatch.setattr(runtime_module, "block_sparse_attn", spy)
    return seen


@pytest.mark.parametrize("model", sorted(PIPELINES))
def test_generate_runs_the_model_pipeline(model, layouts, tmp_path, capsys):
    build, frames, latent = PIPELINES[model]
    folder = build(str(tmp_path / model))
    video = tmp_path / "out.mp4"
    assert main(["generate", folder, *ARGS, "--frames", str(frames), "--output", str(video)]) == 0

    with imageio.get_reader(str(video)) as reader:
        assert reader.count_frames() == frames
    out = capsys.readouterr().out
    assert re.search(r"wall time: \d+\.\d+ s", out), out
    assert float(re.search(r"layout density: (\S+)", out).group(1)) < 1.0
    assert re.search(r"backend: reference$", out, re.M), out

    offsets = [layout.meta["offset"] for layout in layouts]
    per_step = len(offsets) // STEPS
    assert per_step > 0 and offsets == [step for step in range(STEPS) for _ in range(per_step)]
    assert {layout.meta["frames"] for layout in layouts} == {latent}
    if model == "skyreels_v2_diffusion_forcing":  # block-causal layout (num_frame_per_block 2)
        assert {layout.meta.get("causal_block") for layout in layouts} == {2}
