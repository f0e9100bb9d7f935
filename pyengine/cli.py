"""The `pyengine` command line: one subcommand per module in `pyengine.commands`.

Each command module has a docstring (its help line), `add_arguments(parser)` and `run(args) -> int`.
A `ModelLoadError` anywhere becomes one `[ERROR] ...` line on stderr and exit code 1."""

import argparse
import importlib
import os
import sys

from pyengine import __version__
from pyengine.errors import ModelLoadError
from pyengine.log import configure

COMMANDS = ("info", "validate", "convert", "demo-model", "synth", "run", "chat", "bench", "serve")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pyengine", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pyengine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"pyengine.commands.{name.replace('-', '_')}")
        p = sub.add_parser(name, help=module.__doc__.strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    configure(getattr(args, "verbose", False))
    try:
        return args._run(args) or 0
    except ModelLoadError as e:
        print(f"[ERROR] {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`pyengine info --json | head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
