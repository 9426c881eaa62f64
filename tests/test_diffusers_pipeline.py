"""Step tracking through a real WanPipeline built from tiny components (no downloads), and the StepTracker rules.

The rotation offset seen by the processors must advance once per denoising step (both CFG calls share
it), keep counting across the Wan 2.2 expert switch, and restart at 0 on the next pipeline call.
"""
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import WanPipeline  # noqa: E402

import lvsa_kernels.diffusers.runtime as runtime_module  # noqa: E402
from lvsa_kernels.diffusers import StepTracker, disable_lvsa, enable_lvsa  # noqa: E402

from tiny_wan import tiny_pipeline  # noqa: E402

KFI = 3
PATTERN = dict(window=1, n_first=1, reference_frames=2, key_frame_interval=KFI)


@pytest.fixture
def offsets(monkeypatch):
    """(rotation offset, layout object id) of every attention call the LVSA processors make."""
    seen = []
    real = runtime_module.block_sparse_attn

    def spy(q, k, v, layout, **kw):
        seen.append((layout.meta["offset"], id(layout)))
        return real(q, k, v, layout, **kw)

    monkeypatch.setattr(runtime_module, "block_sparse_attn", spy)
    return seen


def generate(pipe, steps, output_type="np"):
    g = torch.Generator().manual_seed(0)
    return pipe(prompt_embeds=torch.randn(1, 12, 16, generator=g),
                negative_prompt_embeds=torch.randn(1, 12, 16, generator=g),
                height=32, width=32, num_frames=17, num_inference_steps=steps, guidance_scale=5.0,
                output_type=output_type).frames


def per_step(seen, calls_per_step):
    assert len(seen) % calls_per_step == 0
    steps = [seen[i:i + calls_per_step] for i in range(0, len(seen), calls_per_step)]
    # CFG calls and all layers (of both experts) share one offset and one planned layout object per step
    assert all(len(set(s)) == 1 for s in steps), steps
    return [s[0][0] for s in steps]


def test_wan_pipeline_rotation_per_step_with_cfg(offsets):
    pipe = tiny_pipeline()
    handle = enable_lvsa(pipe, backend="reference", **PATTERN)
    try:
        video = generate(pipe, 3)
        assert video.shape[:2] == (1, 17) and torch.isfinite(torch.as_tensor(video)).all()
        calls = 2 * len(pipe.transformer.blocks)    # cond + uncond per layer
        assert per_step(offsets, calls) == [0, 1, 2]
        offsets.clear()
        handle.runtime.tracker.observe(2000.0)      # stale state that timestep detection alone would continue
        generate(pipe, 3, output_type="latent")     # the pipeline call restarts the rotation at step 0
        assert per_step(offsets, calls) == [0, 1, 2]
        assert handle.runtime.tracker.generation == 2
    finally:
        disable_lvsa(pipe)
    assert type(pipe) is WanPipeline and "_lvsa_handle" not in pipe.__dict__


def test_wan22_two_experts_share_one_step_counter(offsets):
    pipe = tiny_pipeline(two_experts=True)
    expert_calls = []
    hooks = [t.register_forward_pre_hook(lambda m, a, k, i=i: expert_calls.append(i), with_kwargs=True)
             for i, t in enumerate((pipe.transformer, pipe.transformer_2))]
    handle = enable_lvsa(pipe, backend="reference", **PATTERN)
    try:
        assert handle.transformers == [pipe.transformer, pipe.transformer_2]
        generate(pipe, 5, output_type="latent")
    finally:
        disable_lvsa(pipe.transformer_2)            # disabling through either expert undoes everything
        for h in hooks:
            h.remove()
    assert 0 in expert_calls and 1 in expert_calls  # the run switched experts
    assert per_step(offsets, 2 * 2) == [0, 1, 2, 0, 1]   # step mod kfi across the switch
    assert type(pipe) is WanPipeline
    assert all(type(b.attn1.processor).__name__ == "WanAttnProcessor"
               for t in (pipe.transformer, pipe.transformer_2) for b in t.blocks)


def test_step_tracker_rules():
    tr = StepTracker()
    assert [tr.observe(t) for t in (999.0, 999.0, 950.0, 950.0, 900.0)] == [0, 0, 1, 1, 2]
    assert tr.generation == 0
    assert tr.observe(torch.tensor([999.0, 999.0])) == 0          # timestep went up: new generation
    assert tr.generation == 1
    assert tr.observe(torch.tensor([[0.0, 800.0, 800.0]])) == 1    # per-token timesteps (Wan 2.2 TI2V): max
    tr.new_generation()
    assert tr.observe(800) == 0 and tr.generation == 2
    with pytest.raises(TypeError, match="timestep"):
        tr.observe("800")
    with pytest.raises(ValueError, match="non-empty"):
        tr.observe(torch.tensor([]))
