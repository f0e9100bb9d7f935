"""Stop strings over streamed text: cut at the first match, never stream a stop string's start.

Text that could still become a stop string is held back until the next piece decides it, so a
streamed answer and a non-streamed one are the same text. Each stop string keeps a Knuth–Morris–
Pratt state (how much of it the text now ends with), so every generated character is looked at a
bounded number of times per stop string: the work is linear in the generated text, whatever the
stop strings are. The node also bounds how many there are and how long (`check_stops`), as OpenAI
does, so one request cannot make the scheduler thread slow for every other one."""

from __future__ import annotations

MAX_STOPS = 4
MAX_STOP_CHARS = 256  # at most 1 KiB of UTF-8 per stop string


def check_stops(stops: list[str]) -> None:
    """ValueError unless `stops` are at most MAX_STOPS non-empty strings of at most MAX_STOP_CHARS."""
    if len(stops) > MAX_STOPS or any(not 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise ValueError(f"stop takes at most {MAX_STOPS} non-empty strings of at most "
                         f"{MAX_STOP_CHARS} characters each")


def _failure(s: str) -> list[int]:
    """KMP failure function: fail[i] = length of the longest proper border of s[:i + 1]."""
    fail = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


class StopMatcher:
    """Feed text pieces; get back what may be sent now and whether a stop string was hit."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._fail = [_failure(s) for s in self.stops]
        self._matched = [0] * len(self.stops)  # per stop: how much of it the text ends with
        self.held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """The text that can be sent now and whether a stop string was completed. On a hit the text
        is cut where the earliest stop string found in it (held text included) begins."""
        if not self.stops:
            return piece, False
        text = self.held + piece
        base = len(self.held)
        cut = -1
        for k, s in enumerate(self.stops):
            m, fail = self._matched[k], self._fail[k]
            for i in range(base, len(text)):
                c = text[i]
                while m and s[m] != c:
                    m = fail[m - 1]
                if s[m] == c:
                    m += 1
                if m == len(s):
                    start = i + 1 - m
                    cut = start if cut < 0 else min(cut, start)
                    break
            self._matched[k] = m
        if cut >= 0:
            self.held = ""
            self._matched = [0] * len(self.stops)
            return text[:cut], True
        keep = max(self._matched)  # every possible match in progress starts within the last `keep`
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """The held-back text, once generation ended without a match."""
        text, self.held = self.held, ""
        self._matched = [0] * len(self.stops)
        return text
