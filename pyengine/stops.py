"""Stop strings over streamed text: cut at the first match, never stream a stop string's start.

Text that could still become a stop string is held back until the next piece decides it, so a
streamed answer and a non-streamed one are the same text."""

from __future__ import annotations


class StopMatcher:
    """Feed text pieces; get back what may be sent now and whether a stop string was hit."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        if not self.stops:
            return piece, False
        text = self.held + piece
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held = ""
            return text[:cut], True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:n]):
                    keep = n
                    break
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """The held-back text, once generation ended without a match."""
        text, self.held = self.held, ""
        return text
