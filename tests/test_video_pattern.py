"""The pattern protocol the diffusers runtime uses (`VideoPattern`): LVSA plans a typed `AttentionPlan` from an
`AttentionCall` (grid, step, text, leading frames, block-causal masks); SVOO refuses what it cannot plan."""
import pytest
import torch

from lvsa_kernels import SVOOPattern
from lvsa_kernels.reference import AttentionPlan, BlockSparseLayout, LVSAPattern
from lvsa_kernels.reference.plan import AttentionCall

SPARSE = dict(window=1, reference_frames=2, key_frame_interval=3)


@pytest.mark.parametrize("frames,block,step", [(8, 2, 0), (8, 2, 1), (12, 3, 2), (6, 1, 0), (6, 6, 1)])
def test_causal_plan_is_lvsa_and_block_causal(frames, block, step):
    p = LVSAPattern(**SPARSE)
    layout = p.causal_plan(frames, 5, step, block)
    b = torch.arange(frames) // block
    want = BlockSparseLayout.from_block_mask(p.frame_mask(frames, step) & (b[None, :] <= b[:, None]),
                                             [5] * frames, [5] * frames)
    assert torch.equal(layout.to_block_mask(), want.to_block_mask())
    assert layout.q_len == layout.kv_len == frames * 5 and layout.meta["causal_block"] == block
    assert layout.meta["offset"] == p.rotation_offset(frames, step)


def test_causal_plan_checks_the_block():
    with pytest.raises(ValueError, match="frames_per_block: the 8 frames are not a multiple of 3"):
        LVSAPattern(**SPARSE).causal_plan(8, 4, 0, 3)


def test_plan_call_gives_the_typed_plan_of_the_call():
    p = LVSAPattern(**SPARSE)
    plan = p.plan_call(None, None, AttentionCall(9, 4, step=2, layer=5, branch=1, text_tokens=3,
                                                text_position="before"))
    assert isinstance(plan, AttentionPlan) and not plan.permuted
    assert plan.blocks is p.plan(9, 4, step=2, text_tokens=3, text_position="before")
    lead = p.plan_call(None, None, AttentionCall(9, 4, step=0, leading_frames=2)).blocks
    assert lead.meta["n_first"] == 3 and lead.meta["global_frames"][:3] == (0, 1, 2)
    causal = p.plan_call(None, None, AttentionCall(8, 4, step=1, causal_block=2)).blocks
    assert causal is p.causal_plan(8, 4, 1, 2)
    what, fields = p.summary(plan)
    assert what == "LVSA engaged" and fields.startswith(f"text=3 kfi=3 offset={2 % 3} density=")


def test_svoo_refuses_masks_it_cannot_plan():
    q = torch.randn(1, 32, 2, 16)
    pattern = SVOOPattern(q_clusters=2, k_clusters=2, warmup_steps=0)
    for call in (AttentionCall(2, 16, 0, causal_block=1), AttentionCall(2, 16, 0, leading_frames=1),
                 AttentionCall(2, 12, 0, text_tokens=8, text_position="before")):
        with pytest.raises(NotImplementedError, match="SVOO: plans video"):
            pattern.plan_call(q, q, call)
    assert pattern.plan_call(q, q, AttentionCall(2, 16, 0, backend="reference")).permuted
