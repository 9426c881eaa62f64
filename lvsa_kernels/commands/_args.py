"""argparse value types shared by the commands: a bad value becomes a usage error (exit 2) that names the
option and the value, instead of a traceback from deep inside the library."""
from __future__ import annotations

import argparse
import math
from typing import Callable, Optional


class UsageError(Exception):
    """A value that passed its option's type check but does not fit the other options.

    ``run(args)`` raises it; ``__main__`` prints it as the command's usage error (exit 2).
    """


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value
    parse.__name__ = f"int >= {low}"
    return parse


def float_in(low: float, high: Optional[float] = None, low_open: bool = True) -> Callable[[str], float]:
    """An argparse type: a finite float in ``(low, high]`` (``[low, high]`` when ``low_open`` is False)."""
    bounds = f"{'(' if low_open else '['}{low:g}, {'inf)' if high is None else f'{high:g}]'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {bounds}, got {text!r}") from None
        above = value > low if low_open else value >= low
        if not (math.isfinite(value) and above and (high is None or value <= high)):
            raise argparse.ArgumentTypeError(f"expected a number in {bounds}, got {text!r}")
        return value
    parse.__name__ = f"number in {bounds}"
    return parse


POSITIVE = int_at_least(1)
NON_NEGATIVE = int_at_least(0)
