"""Checks shared by the per-model diffusers tests. Import only after ``pytest.importorskip("diffusers")``."""
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from lvsa_kernels.diffusers import disable_lvsa, enable_lvsa


def assert_dense_pattern_matches_original(model, x: dict, run: Callable, frames: int) -> None:
    """With reference_frames = ``frames`` the LVSA pattern is dense (kfi 1): outputs equal the original processors."""
    expected = run(model, x, 700)
    handle = enable_lvsa(model, backend="reference", reference_frames=frames)
    try:
        assert handle.runtime.pattern.key_frame_interval_for(frames) == 1
        got = run(model, x, 700)
    finally:
        disable_lvsa(model)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _clone(x):
    if torch.is_tensor(x):
        return x.clone()
    if isinstance(x, (tuple, list)):
        return tuple(_clone(i) for i in x)
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x


@contextmanager
def recorded_calls(modules: Sequence[torch.nn.Module], with_kwargs: bool = False) -> Iterator[List[tuple]]:
    """Record ``(module, args, output)`` (``(module, kwargs, output)`` with ``with_kwargs``), cloned, of every
    forward of ``modules`` while the block runs; the hooks are removed afterwards."""
    calls: List[tuple] = []

    def record(module, args, *rest):
        inputs, output = (rest[0], rest[1]) if with_kwargs else (args, rest[0])
        calls.append((module, _clone(inputs), _clone(output)))

    hooks = [m.register_forward_hook(record, with_kwargs=with_kwargs) for m in modules]
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


def second_step_calls(model: torch.nn.Module, modules: Sequence[torch.nn.Module], run: Callable, x: dict,
                      with_kwargs: bool = False, **knobs) -> Tuple[List[tuple], object]:
    """``enable_lvsa(model, backend="reference", **knobs)``, one call at timestep 900 and one at 800 (the second
    denoising step: rotation offset 1), LVSA disabled again. Returns the `recorded_calls` of ``modules``
    during the second step, and the handle."""
    with recorded_calls(modules, with_kwargs) as calls:
        handle = enable_lvsa(model, backend="reference", **knobs)
        try:
            run(model, x, 900)
            calls.clear()
            run(model, x, 800)
        finally:
            disable_lvsa(model)
    return calls, handle


def _processors(model: torch.nn.Module) -> dict:
    """The attention processor of every module of ``model`` that has one, by module name."""
    return {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}


def assert_sparse_differs_and_round_trip(model, x: dict, run: Callable, replaced: Sequence[torch.nn.Module],
                                         **sparse) -> None:
    """A sparse pattern (``sparse`` knobs) changes the output, LVSA replaces exactly the processors of ``replaced``
    (every other attention processor of ``model`` is kept), and `disable_lvsa` restores the original processor
    objects and the output exactly."""
    before = run(model, x, 500)
    originals = [m.processor for m in replaced]
    others = _processors(model)
    handle = enable_lvsa(model, backend="reference", **sparse)
    try:
        assert [attn for attn, _ in handle._originals] == list(replaced)
        kept = {name: p for name, p in _processors(model).items() if not any(p is m.processor for m in replaced)}
        assert all(kept[name] is others[name] for name in kept)
        assert len(kept) == len(others) - len(replaced)
        sparse_out = run(model, x, 500)
    finally:
        disable_lvsa(model)
    assert all(m.processor is p for m, p in zip(replaced, originals))
    assert torch.equal(run(model, x, 500), before)
    assert not torch.allclose(sparse_out, before, atol=1e-4)


def assert_svoo_three_way(model, x: dict, run: Callable, **svoo) -> None:
    """SVOO (`enable_svoo`) on ``model``: top_p = 1 equals the original processors to fp32 precision, a sparse SVOO
    pattern (top_p 0.3, reclustered every 2 steps) changes the output at its second step, and `disable_lvsa`
    restores the original output exactly. ``svoo``: cluster counts for the tiny sizes."""
    from lvsa_kernels.diffusers import enable_svoo

    knobs = dict(q_clusters=4, k_clusters=8, warmup_steps=0, **svoo)
    expected = run(model, x, 700)
    enable_svoo(model, backend="reference", top_p=1.0, **knobs)
    try:
        torch.testing.assert_close(run(model, x, 700), expected, rtol=1e-5, atol=1e-5)
    finally:
        disable_lvsa(model)
    handle = enable_svoo(model, backend="reference", top_p=0.3, recluster_every=2, **knobs)
    try:
        run(model, x, 900)
        sparse = run(model, x, 800)  # the second step reuses the first step's clusters
        assert max(handle.runtime.plan_densities()) < 0.9
    finally:
        disable_lvsa(model)
    dense = run(model, x, 800)
    assert torch.isfinite(sparse).all() and not torch.allclose(sparse, dense, atol=1e-4)
    assert torch.equal(run(model, x, 700), expected)


def assert_joint_layers_match_masked_original(model, modules: Sequence[torch.nn.Module], run: Callable, x: dict,
                                              frames: int, tokens_per_frame: int, text_tokens: int,
                                              mask_batch: Optional[int] = None, **sparse) -> None:
    """At the second denoising step each joint-attention call (``[text; video]``, text first, returning
    ``(video, text)``) equals the original processor given the planned LVSA layout as its boolean
    ``attention_mask`` (``[S, S]``, or ``[mask_batch, S, S]`` for processors that reshape it per batch)."""
    from lvsa_kernels import LVSAPattern

    originals = {id(m): m.processor for m in modules}
    calls, _ = second_step_calls(model, modules, run, x, with_kwargs=True, **sparse)
    layout = LVSAPattern(**sparse).plan(frames, tokens_per_frame, step=1, text_tokens=text_tokens,
                                        text_position="before")
    assert layout.meta["offset"] == 1 and layout.density < 0.9
    mask = layout.to_token_mask()[0]
    if mask_batch is not None:
        mask = mask.expand(mask_batch, -1, -1)
    assert len(calls) == len(modules)
    for attn, kwargs, (video, text) in calls:
        with torch.no_grad():
            want_video, want_text = originals[id(attn)](attn, **kwargs, attention_mask=mask)
        torch.testing.assert_close(video, want_video, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(text, want_text, rtol=1e-5, atol=1e-5)
