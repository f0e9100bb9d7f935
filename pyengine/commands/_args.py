"""Argument types with ranges, and a parser that reports a bad value in one line.

Why: a value the engine would refuse (`--top-p 2`, `-t 0`, `--port 99999`, `--device tpu`) must
be refused while the arguments are parsed, as one `[ERROR] ...` line and exit code 2, before any
model is opened, never as a traceback from deep inside."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """argparse, whose errors are one `[ERROR] PROG: MESSAGE (see PROG --help)` line, exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"[ERROR] {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def integer(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An int in [lo, hi] (either bound may be open)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {_range(lo, hi)}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def real(lo: float, hi: float | None = None) -> Callable[[str], float]:
    """A finite float in [lo, hi] (hi None: no upper bound)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {_range(lo, hi)}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def device(text: str) -> str:
    """cpu, cuda or cuda:N (whether that GPU exists is checked when the model opens)."""
    from pyengine.cuda import parse_device

    try:
        parse_device(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    return text


def _range(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"in [{lo}, {hi}]"
    return f">= {lo}" if lo is not None else f"<= {hi}"
