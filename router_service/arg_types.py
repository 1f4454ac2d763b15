"""argparse types for bounded numbers, one for every command-line tool of the project: a bad value is refused
with a message naming it and the bound it breaks (argparse then prints the usage and exits with status 2)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def bounded(kind: type[int] | type[float], at_least: float | None = None, above: float | None = None,
            at_most: float | None = None) -> Callable[[str], float]:
    """An argparse type: ``kind(text)`` within the bounds given (``above`` is exclusive); nan is always refused."""
    bounds = [f">= {at_least:g}" for _ in [at_least] if at_least is not None]
    bounds += [f"> {above:g}" for _ in [above] if above is not None]
    bounds += [f"<= {at_most:g}" for _ in [at_most] if at_most is not None]
    wanted = f"{'an integer' if kind is int else 'a number'}" + (f" {' and '.join(bounds)}" if bounds else "")

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if value != value or (at_least is not None and not value >= at_least) or (
                above is not None and not value > above) or (at_most is not None and not value <= at_most):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text}")
        return value

    return parse


positive_int = bounded(int, at_least=1)
non_negative_int = bounded(int, at_least=0)
non_negative_float = bounded(float, at_least=0)
positive_float = bounded(float, above=0)
