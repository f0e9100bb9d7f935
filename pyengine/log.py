"""The engine's log lines, in the `[LEVEL] message` form routers and users grep for."""

import logging
import sys

logger = logging.getLogger("pyengine")


def configure(verbose: bool = False) -> None:
    """Send pyengine's log lines to stderr as `[INFO] ...` (idempotent)."""
    if not any(getattr(h, "_pyengine", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
        handler._pyengine = True
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
