"""Serve a model over an OpenAI-compatible HTTP API (same flags as `llm-router-node`)."""

import argparse
import sys

try:  # the web stack is only needed here: every other command runs without it (a GPU image, say)
    from pyengine.node import cli
except ImportError as e:
    cli, _missing = None, e


def add_arguments(p: argparse.ArgumentParser) -> None:
    if cli is not None:
        cli.add_arguments(p)
    else:  # take every argument as text (no option parsing), so run() can say what is missing
        p.prefix_chars = "\0"
        p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if cli is None:
        print(f"[ERROR] serve needs the node's web packages ({_missing}); install pyengine's dependencies",
              file=sys.stderr)
        return 1
    return cli.run(args)
