"""EngineState: a KV cache's contents (the tokens, the K/V rows they wrote), in memory and on disk.

Engine.save_state gives one, Engine.load_state puts it back (llama-cpp-python's names); the node's
slots use the same (POST /slots/{id}?action=save|restore, llama-server's slot files). On disk a
conversation's cache outlives the process: `EngineState.save(path)` writes it, a later process
reads it with `EngineState.load(path)` and continues without evaluating the prompt again (what
llama.cpp's state files are for).

The file is a numpy .npz archive (uncompressed: the K/V rows do not shrink): `format`, `key` (the
state's key as JSON: model file name and size, cache layout, K/V types), `tokens` (int32), one
array per K/V block, `rows000`, `rows001`, ..., and the cache's checkpoints of its sliding rings
when it has some (pyengine.runner.Checkpoint: `checkpoint_n`, their token counts, oldest first, and
`ring000`, ... , the first checkpoint's rings, then the second's; a file of the first version of
this layout holds one count as a scalar), so that a restored conversation's next turn reuses its
earlier prompts as the uninterrupted one would. It is read without
pickle, so a file from anywhere can only ever yield arrays; anything else (truncated, another
format, missing or malformed members) is a StateFileError naming the file. Written to a temporary file beside the target and
renamed over it, so an interrupted save never leaves half a file under the name."""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pyengine.runner import Checkpoint

FORMAT = "pyengine-state/1"


class StateFileError(ValueError):
    """A file that is not a state file this version of pyengine can read; `reason` says why
    without the path (the node answers with it)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.reason = reason


class _Malformed(Exception):
    """Why _members refused a file (StateFileError adds the path)."""


@dataclass
class EngineState:
    """A KV cache's contents: the tokens, per layer the K then V rows they wrote (numpy arrays, as
    pyengine.runner.Runner.used_rows gives them), the key the engine that loads it must match
    (model file name and size, cache layout, K/V types, how the cache keeps its rows:
    Engine._state_key), and the cache's
    checkpoints of its sliding rings, oldest first."""

    tokens: list[int]
    rows: list[np.ndarray]
    key: tuple
    checkpoints: tuple[Checkpoint, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.rows) + sum(c.nbytes for c in self.checkpoints)

    def save(self, path: str | os.PathLike) -> int:
        """Write this state to a file (replacing one there); the bytes written."""
        path = Path(path)
        arrays: dict[str, Any] = {"format": np.array(FORMAT), "key": np.array(json.dumps(self.key)),
                                  "tokens": np.asarray(self.tokens, dtype=np.int32)}
        arrays.update((f"rows{i:03d}", r) for i, r in enumerate(self.rows))
        if self.checkpoints:
            arrays["checkpoint_n"] = np.array([c.n for c in self.checkpoints], dtype=np.int64)
            rings = [r for c in self.checkpoints for r in c.rings]
            arrays.update((f"ring{i:03d}", r) for i, r in enumerate(rings))
        fd, tmp = tempfile.mkstemp(prefix=".pyengine-state-", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path.stat().st_size

    @classmethod
    def load(cls, path: str | os.PathLike) -> EngineState:
        """The state in a file `save` wrote. OSError when it cannot be opened (e.g.
        FileNotFoundError); StateFileError (a ValueError) when it is not a readable state file."""
        path = Path(path)
        with open(path, "rb") as f:
            try:
                return cls(*_members(f))
            except _Malformed as e:
                raise StateFileError(path, str(e)) from None
            except (ValueError, KeyError, EOFError, OSError, zipfile.BadZipFile, zipfile.LargeZipFile) as e:
                raise StateFileError(path, f"not a readable pyengine state file ({type(e).__name__}: {e})") \
                    from None


def _members(f: Any) -> tuple[list[int], list[np.ndarray], tuple, tuple[Checkpoint, ...]]:
    archive = np.load(f, allow_pickle=False)
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise _Malformed("not a pyengine state file (a single .npy array)")
    with archive:
        names = set(archive.files)
        if not {"format", "key", "tokens"} <= names or str(archive["format"]) != FORMAT:
            raise _Malformed(f"not a {FORMAT} file")
        key = _tupled(json.loads(str(archive["key"])))
        tokens = archive["tokens"]
        if tokens.ndim != 1 or tokens.dtype != np.int32:
            raise _Malformed("its tokens are not a list of int32 ids")
        rows, rings = _blocks(archive, names, "rows"), _blocks(archive, names, "ring")
        if names - {"format", "key", "tokens", "checkpoint_n"} != {f"rows{i:03d}" for i in range(len(rows))} | {
                f"ring{i:03d}" for i in range(len(rings))}:
            raise _Malformed("its members are not format, key, tokens, rows000.. and checkpoint_n, ring000..")
        checkpoints: tuple[Checkpoint, ...] = ()
        if "checkpoint_n" in names:
            counts = archive["checkpoint_n"]
            counts = counts.reshape(1) if counts.ndim == 0 else counts
            per = len(rings) // max(len(counts), 1)
            if (counts.ndim != 1 or counts.dtype != np.int64 or not counts.size or not per
                    or per * len(counts) != len(rings) or not 0 < counts[0] or not counts[-1] <= len(tokens)
                    or not np.all(np.diff(counts) > 0)):
                raise _Malformed("its checkpoints are not increasing token counts within its tokens, "
                                 "with the same number of rings each")
            checkpoints = tuple(Checkpoint(int(n), tuple(rings[k * per:(k + 1) * per]))
                                for k, n in enumerate(counts))
        elif rings:
            raise _Malformed("it has checkpoint rings without checkpoint_n")
    return tokens.tolist(), rows, key, checkpoints


def _blocks(archive: Any, names: set[str], prefix: str) -> list[np.ndarray]:
    """The 3-D numeric arrays prefix000, prefix001, ... up to the first gap."""
    blocks = []
    while f"{prefix}{len(blocks):03d}" in names:
        block = archive[f"{prefix}{len(blocks):03d}"]
        if block.ndim != 3 or block.dtype.kind not in "uif":
            raise _Malformed(f"{prefix}{len(blocks):03d} is not a 3-D numeric array")
        blocks.append(block)
    return blocks


def _tupled(value: Any) -> Any:
    """JSON's lists back into the tuples a state's key is made of."""
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value
