"""`eager`: ``torch.compiler.disable`` applied on the first call, so that importing a module that uses it does not
import ``torch._dynamo`` (about a second); a compiled caller graph-breaks around the call either way."""
from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

__all__ = ["eager"]

F = TypeVar("F", bound=Callable)


def eager(fn: F) -> F:
    """``fn`` always runs eagerly, also when called from code being compiled (see the module docstring)."""
    disabled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return call  # type: ignore[return-value]
