"""Serve a model over an OpenAI-compatible HTTP API (same flags as `llm-router-node`)."""

import argparse

from pyengine.node import cli


def add_arguments(p: argparse.ArgumentParser) -> None:
    cli.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    return cli.run(args)
