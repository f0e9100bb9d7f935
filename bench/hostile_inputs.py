"""Work per request on hostile inputs (issue 18): long words through the tokenizer, long stop strings.

    python bench/hostile_inputs.py [--mib 1 3 8]

Tokenizer: one word of N MiB of random lowercase letters, through pyengine's Tokenizer (pieces over
LONG_PIECE characters in chunks) and through tiktoken on the same vocabulary as one piece, and a
normal text (to show the long-run check costs the usual path nothing). Stops: 3,000 one-character
pieces against the largest stop set the node accepts (4 x 256 characters), chosen so every
stop string is always partly matched: the worst case for the matcher."""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import vocab

from pyengine.stops import MAX_STOP_CHARS, MAX_STOPS, StopMatcher
from pyengine.tokenizer import Tokenizer


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=float, nargs="+", default=[1, 3, 8])
    args = ap.parse_args()
    tok = Tokenizer.from_metadata(vocab.harmony_metadata())
    rng = random.Random(0)
    for mib in args.mib:
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(int(mib * 2**20)))
        ours = timed(lambda: tok.encode(word))
        whole = timed(lambda: tok._encoding.encode_ordinary(word))
        print(f"one word of {mib:g} MiB: {ours:.2f} s chunked, {whole:.2f} s as one piece (tiktoken)")
    prose = " ".join("".join(rng.choice("etaoinshrdlu") for _ in range(rng.randint(1, 9))) for _ in range(400000))
    ours = timed(lambda: tok.encode(prose))
    plain = timed(lambda: tok._encoding.encode_ordinary(prose))
    print(f"{len(prose) / 2**20:.1f} MiB of short words: {ours:.2f} s (tiktoken alone {plain:.2f} s)")

    stops = ["b" * (MAX_STOP_CHARS - 1) + c for c in "cdef"[:MAX_STOPS]]
    m = StopMatcher(stops)
    elapsed = timed(lambda: [m.feed("b") for _ in range(3000)])
    print(f"stops {MAX_STOPS} x {MAX_STOP_CHARS} chars, 3000 pieces always partly matched: "
          f"{elapsed * 1e3:.1f} ms ({elapsed / 3000 * 1e6:.1f} us per piece)")


if __name__ == "__main__":
    main()
