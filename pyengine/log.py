"""The engine's log lines, in the `[LEVEL] message` form routers and users grep for."""

import logging
import sys

logger = logging.getLogger("pyengine")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the record, so a redirected or
    captured stderr (pytest, a daemon) never leaves the handler holding a closed stream."""

    _pyengine = True

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def configure(verbose: bool = False) -> None:
    """Send pyengine's log lines to stderr as `[INFO] ...` (idempotent)."""
    if not any(getattr(h, "_pyengine", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
