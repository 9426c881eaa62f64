"""Denoising-step tracking for the diffusers integration.

The LVSA keyframe rotation advances once per denoising step, not per transformer call. The step is
inferred from the timestep passed to the transformer:

* the first call of a generation is step 0;
* a call with the same timestep as the previous call belongs to the same step (classifier-free
  guidance runs the transformer twice per step, or once on a doubled batch);
* a smaller timestep starts the next step (timesteps decrease within a generation);
* a larger timestep starts a new generation at step 0 (a bare transformer has no pipeline call to
  watch; with a pipeline, `StepTracker.new_generation` is also called at each pipeline call).

A pipeline whose timesteps do not fall once per step (SkyReels-V2 diffusion forcing: per-frame timesteps)
gives its own step counter instead: `StepTracker.observe_marker` with an object the pipeline replaces at
each denoising iteration.

One tracker is shared by every transformer of a pipeline (Wan 2.2 A14B switches between two experts
mid-run without resetting the rotation).
"""
from __future__ import annotations

from typing import Optional, Union

from torch import Tensor

__all__ = ["StepTracker", "timestep_value"]


def timestep_value(timestep: Union[Tensor, float, int]) -> float:
    """The scalar timestep of one transformer call.

    Args:
        timestep: a number, or a tensor ``[]``, ``[B]`` or ``[B, S]`` (Wan 2.2 TI2V passes per-token
            timesteps that are 0 on conditioning frames); the maximum entry is the step's timestep.
    """
    if isinstance(timestep, Tensor):
        if timestep.numel() == 0:
            raise ValueError("timestep: expected a non-empty tensor, got an empty one")
        return float(timestep.detach().max())
    if isinstance(timestep, (int, float)):
        return float(timestep)
    raise TypeError(f"timestep: expected a tensor or a number, got {type(timestep).__name__}")


class StepTracker:
    """Maps the timestep of each transformer call to a 0-based denoising step (see module docstring).

    Attributes:
        step: the current step, or None before the first call of a generation.
        call: 0-based index of the current transformer call within its step (0 and 1 for the two
            classifier-free-guidance branches when the pipeline runs them as separate calls).
        generation: counts generations since creation (starts at 0, +1 at each new generation).
        announced: whether the current generation's summary line was logged.
    """

    def __init__(self) -> None:
        self.step: Optional[int] = None
        self.call = 0
        self.generation = 0
        self.announced = False
        self._last: Optional[float] = None
        self._marker: Optional[object] = None

    def new_generation(self) -> None:
        """Restart the rotation: the next call is step 0 of a new generation."""
        if self.step is not None:
            self.generation += 1
        self.step = None
        self.call = 0
        self.announced = False
        self._last = None
        self._marker = None

    def observe(self, timestep: Union[Tensor, float, int]) -> int:
        """Record one transformer call with ``timestep`` and return its denoising step."""
        t = timestep_value(timestep)
        if self._last is not None and t > self._last:
            self.new_generation()
        if self.step is None:
            self.step, self.call = 0, 0
        elif t != self._last:
            self.step, self.call = self.step + 1, 0
        else:
            self.call += 1
        self._last = t
        return self.step

    def observe_marker(self, marker: object) -> int:
        """Record one transformer call of the pipeline iteration identified by ``marker`` (an object the
        pipeline replaces at each denoising iteration, compared by identity) and return its step."""
        if self.step is None:
            self.step, self.call = 0, 0
        elif marker is not self._marker:
            self.step, self.call = self.step + 1, 0
        else:
            self.call += 1
        self._marker = marker
        return self.step

    def __repr__(self) -> str:
        return (f"StepTracker(generation={self.generation}, step={self.step}, call={self.call}, "
                f"last_timestep={self._last})")
