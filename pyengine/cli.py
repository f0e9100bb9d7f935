"""The `pyengine` command line: one subcommand per module in `pyengine.commands`.

Each command module has a docstring (its help line), `add_arguments(parser)` and `run(args) -> int`.
A bad argument is one `[ERROR] ...` line and exit code 2 (checked while parsing); a `ModelLoadError`
anywhere becomes one `[ERROR] ...` line and exit code 1. Ctrl-C at any moment, imports included,
ends quietly with exit code 130, also when the process inherited an ignored SIGINT (started in the
background); SIGTERM ends a command other than `serve` the same way, with exit code 143."""

import os
import signal
import sys
import threading

COMMANDS = ("info", "validate", "convert", "demo-model", "synth", "run", "chat", "bench", "serve")


_terminated: list[int] = []  # SIGTERM arrived: a command that took it for Ctrl-C still exits 143
_deferred: list[int] = []  # Ctrl-C during start-up, acted on once the imports are done


def _terminate(sig: int, frame: object) -> None:
    """SIGTERM, raised where Ctrl-C would be, so a reply in progress ends (and shows) the same way."""
    _terminated.append(sig)
    raise KeyboardInterrupt


def main(argv=None) -> int:
    return _guarded(_main, argv)


def node_main(argv=None) -> int:
    """`llm-router-node`: pyengine.node.cli's main behind the same start-up Ctrl-C guard."""
    return _guarded(_node_main, argv)


def _node_main(argv, in_main_thread: bool) -> int:
    from pyengine.node import cli

    if in_main_thread:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # also when inherited ignored
    if _deferred:
        raise KeyboardInterrupt
    return cli.main(argv)


def _guarded(body, argv) -> int:
    """Run body(argv, in_main_thread) with Ctrl-C during imports deferred, and exit codes 130/143."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    _terminated.clear()
    _deferred.clear()
    if in_main_thread:
        before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        # Imports are not cut in half: some libraries turn a KeyboardInterrupt raised inside them
        # into another error (pydantic-core's SchemaError), so start-up only notes a Ctrl-C.
        signal.signal(signal.SIGINT, lambda sig, frame: _deferred.append(sig))
    interrupted = False
    try:
        code = body(argv, in_main_thread)
    except KeyboardInterrupt:
        code = 130
    finally:
        # Put the caller's SIGINT and SIGTERM handlers back. A Ctrl-C (or SIGTERM) landing now raises
        # KeyboardInterrupt where CPython looks for pending signals: inside a C call that checks
        # (signal.signal does), at a Python function's entry, at a loop's back-edge. So this is
        # inline, not a helper (whose entry lay outside any try: a traceback instead of exit 130),
        # and the try holds both calls: a signal there is counted as Ctrl-C and the handlers set
        # again (harmless). The back-edge is reached only after one was caught; a second signal in
        # that instant could still escape.
        while in_main_thread:
            try:
                signal.signal(signal.SIGINT, before[0])
                signal.signal(signal.SIGTERM, before[1])
                break
            except KeyboardInterrupt:
                interrupted = True
    return 143 if _terminated else 130 if interrupted else code


def _main(argv, in_main_thread: bool) -> int:
    import importlib

    from pyengine import __version__
    from pyengine.commands._args import Parser
    from pyengine.errors import ModelLoadError
    from pyengine.log import configure

    parser = Parser(prog="pyengine", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pyengine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"pyengine.commands.{name.replace('-', '_')}")
        doc = module.__doc__.strip()
        p = sub.add_parser(name, help=doc.splitlines()[0], description=doc)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    configure(getattr(args, "verbose", False))
    if in_main_thread:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # also when inherited ignored
        if args.command != "serve":  # the server has its own SIGTERM handling (ends open streams)
            signal.signal(signal.SIGTERM, _terminate)
    if _deferred:
        raise KeyboardInterrupt
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
