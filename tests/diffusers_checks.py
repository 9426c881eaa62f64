"""Checks shared by the per-model diffusers tests. Import only after ``pytest.importorskip("diffusers")``."""
from typing import Callable

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
