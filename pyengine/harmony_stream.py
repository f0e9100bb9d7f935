"""Harmony output parsed on token ids, one token at a time.

Why token ids: a model that quotes a document can write, with ordinary tokens, text that spells
`<|end|><|start|>assistant<|channel|>commentary to=functions.x<|message|>{...}<|call|>`. A parser
that searches detokenized text would take that for structure (a forged tool call). Here structure
comes only from control-token ids, as in openai-harmony; ordinary tokens are always text, and no
control token ever becomes text (unknown ones such as `<|reserved_200843|>` are dropped).

The parser also tolerates what gpt-oss really emits (see `_parse_header`): a stray
`<|channel|>` before the real one, `<|constrain|>` glued to the recipient, a second message
without `<|start|>assistant`, and a reply with no header at all. A header is short metadata, so
header text that cannot be one (prose, a newline, `<|` spelled with ordinary tokens) is taken
as the answer at once rather than held until the end (docs/generation.md).

Every delta names the generated positions (0-based, in feed order) of the tokens whose bytes it
carries, so logprobs can follow the text into the field it belongs to."""

from __future__ import annotations

import codecs
import secrets
from dataclasses import dataclass, field
from typing import Any

from pyengine.harmony import CALL, CHANNEL, CONSTRAIN, END, ENDOFTEXT, MESSAGE, RETURN, START
from pyengine.tokenizer import Tokenizer

MAX_HEADER_CHARS = 160  # longer header text is an answer written without a header
_TO = "to="


def _parse_header(header: str, role: str | None) -> tuple[str, str | None, str | None, str | None]:
    """(author, recipient, channel, content_type) of a header's text, its control tokens spelled
    out (TokenParser only passes headers whose ordinary text cannot spell one).

    openai-harmony's rules, plus tolerance: every <|channel|>X is removed and the last one wins
    (gpt-oss sometimes emits a stray <|channel|>commentary first), <|constrain|> glued to the
    recipient is split off, stray <|start|> markers are ignored, recipient 'assistant' or 'all'
    means none.
    """
    header = header.replace(START, " ")
    channel = None
    while (idx := header.find(CHANNEL)) >= 0:
        after = header[idx + len(CHANNEL) :]
        end = next((k for k, c in enumerate(after) if c.isspace() or c == "<"), len(after))
        channel = after[:end] or channel
        header = header[:idx] + " " + after[end:]
    header = header.replace(CONSTRAIN, f" {CONSTRAIN}")
    parts = header.split()
    author = role
    if author is None:
        author = parts.pop(0) if parts else "assistant"
    elif parts and parts[0] == author:
        parts.pop(0)
    recipient = content_type = None
    if parts:
        last = parts.pop()
        if last.startswith("to="):
            recipient = last[3:]
        elif not parts and not last.startswith(CONSTRAIN):
            recipient = last
        else:
            content_type = last
            recipient_part = next((p for p in reversed(parts) if p.startswith("to=")), parts[-1] if parts else None)
            if recipient_part is not None:
                recipient = recipient_part.removeprefix("to=")
    if recipient in ("assistant", "all"):
        recipient = None
    return author, recipient, channel, content_type


@dataclass
class Delta:
    """New output. kind: "reasoning" or "content" (text), "tool_call" (a call starts: index, id,
    name) or "tool_args" (argument text of call `index`). positions: the generated tokens whose
    bytes this text completes."""

    kind: str
    text: str = ""
    positions: list[int] = field(default_factory=list)
    index: int = -1
    id: str | None = None
    name: str | None = None


class TokenParser:
    """feed(token id) / finish() -> list[Delta]; message() is the accumulated assistant message
    ({"role", "content", "reasoning_content", "tool_calls"}, fields None when absent)."""

    def __init__(self, tokenizer: Tokenizer, expect_header: bool = True) -> None:
        sp = tokenizer.special_tokens
        self._tok = tokenizer
        self._marks = {sp[s]: s for s in (START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL, ENDOFTEXT)
                       if s in sp}
        self._ends = {i for i, s in self._marks.items() if s in (END, RETURN, CALL, ENDOFTEXT)}
        self.n = 0
        # The prompt ends with <|start|>assistant, so a completion begins inside a header.
        self._state = "header" if expect_header else "between"
        self._role: str | None = "assistant" if expect_header else None
        self._items: list[tuple[str | None, bytes]] = []  # header: (marker spelling | None, text bytes)
        self._held: list[int] = []  # positions whose bytes are in the header or the decoder
        self._kind: str | None = None  # "reasoning" | "content" | "tool" | "ignore"
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._calls: list[dict[str, Any]] = []

    # --- public ------------------------------------------------------------------------------

    def feed(self, token: int) -> list[Delta]:
        pos, self.n = self.n, self.n + 1
        mark = self._marks.get(token)
        if mark is None and self._tok.is_special(token):
            return []  # a control token that means nothing here: never text
        if self._state == "header":
            return self._header_token(mark, token, pos)
        if self._state == "content":
            if mark is None:
                return self._text(self._tok.token_to_piece(token), [pos])
            return self._content_mark(mark)
        return self._between_token(mark, token, pos)

    @property
    def in_reasoning(self) -> bool:
        """Inside the text of an analysis (reasoning) message: a token fed now, with this still
        true after it, is a reasoning token (usage's reasoning_tokens)."""
        return self._state == "content" and self._kind == "reasoning"

    def finish(self) -> list[Delta]:
        out: list[Delta] = []
        if self._state == "header" and any(b.strip() for m, b in self._items if m is None):
            out += self._headerless()
        if self._state == "content":
            out += self._end_message()
        self._state, self._items = "between", []
        return out

    def message(self) -> dict[str, Any]:
        return {
            "role": "assistant",
            "content": "".join(self._content) if self._content else None,
            "reasoning_content": "".join(self._reasoning) if self._reasoning else None,
            "tool_calls": [{"id": c["id"], "type": "function",
                            "function": {"name": c["name"], "arguments": "".join(c["args"])}}
                           for c in self._calls],
        }

    # --- states ------------------------------------------------------------------------------

    def _header_token(self, mark: str | None, token: int, pos: int) -> list[Delta]:
        if mark is None:
            self._items.append((None, self._tok.token_to_piece(token)))
            self._held.append(pos)
            return [] if self._plausible_header() else self._headerless()
        if mark in (CHANNEL, CONSTRAIN):
            self._items.append((mark, b""))
            return []
        if mark == MESSAGE:
            return self._begin_content()
        if mark == START:
            return []  # a stray <|start|> inside a header
        # A message end inside the header: what the header held is the answer.
        out = self._headerless() if any(b.strip() for m, b in self._items if m is None) else []
        self._items = []
        if self._state == "content":
            return out + self._content_mark(mark)
        self._state = "between"
        return out

    def _content_mark(self, mark: str) -> list[Delta]:
        if mark in (MESSAGE, CONSTRAIN):
            return []  # meaningless inside content; dropped
        out = self._end_message()
        if mark == START:
            self._state, self._role, self._items = "header", None, []
        elif mark == CHANNEL:
            self._state, self._role, self._items = "header", "assistant", [(CHANNEL, b"")]
        else:
            self._state = "between"
        return out

    def _between_token(self, mark: str | None, token: int, pos: int) -> list[Delta]:
        if mark == START:
            self._state, self._role, self._items = "header", None, []
        elif mark == CHANNEL:
            self._state, self._role, self._items = "header", "assistant", [(CHANNEL, b"")]
        elif mark is None:
            piece = self._tok.token_to_piece(token)
            if piece.strip():  # text outside any message: the model skipped the header; it is the answer
                self._state, self._kind = "content", "content"
                self._content.append("")
                return self._text(piece, [pos])
        return []  # whitespace between messages is dropped

    # --- headers -----------------------------------------------------------------------------

    def _header_words(self) -> tuple[list[str], list[str]]:
        """Words of the header text before the first <|channel|> and from it on."""
        parts: list[list[bytes]] = [[], []]  # text before the first <|channel|>, and after it
        for mark, raw in self._items:
            if mark == CHANNEL:
                parts[1].append(b" ")
            elif mark == CONSTRAIN:
                parts[bool(parts[1])].append(b" ")
            else:
                parts[bool(parts[1])].append(raw)
        before, after = (b"".join(p).decode("utf-8", "replace").split() for p in parts)
        return before, after

    def _plausible_header(self) -> bool:
        texts = [raw.decode("utf-8", "replace") for mark, raw in self._items if mark is None]
        joined = "".join(texts)
        if "\n" in joined or "<|" in joined or len(joined) > MAX_HEADER_CHARS:
            return False
        before, after = self._header_words()
        if self._role is None and before:
            before = before[1:]  # the author after a bare <|start|>
        ends_open = bool(joined) and not joined[-1].isspace()
        for k, w in enumerate(before):
            last = k == len(before) - 1 and ends_open and not after
            if not (w.startswith(_TO) or (last and _TO.startswith(w))):
                return False
        return len(after) <= 4

    def _header_text(self) -> str:
        return "".join(mark if mark else raw.decode("utf-8", "replace") for mark, raw in self._items)

    def _begin_content(self) -> list[Delta]:
        author, recipient, channel, _ctype = _parse_header(self._header_text(), self._role)
        self._items, self._role, self._held = [], None, []
        self._state = "content"
        if author != "assistant":
            self._kind = "ignore"  # another author's message (e.g. a hallucinated tool result)
            return []
        if recipient is not None:
            self._kind = "tool"
            name = recipient.removeprefix("functions.")
            call_id = f"call_{secrets.token_hex(12)}"
            self._calls.append({"id": call_id, "name": name, "args": []})
            return [Delta("tool_call", index=len(self._calls) - 1, id=call_id, name=name)]
        self._kind = "reasoning" if channel == "analysis" else "content"
        # An empty message still counts: its field becomes "" rather than None.
        (self._reasoning if self._kind == "reasoning" else self._content).append("")
        return []

    def _headerless(self) -> list[Delta]:
        """Leave a header that is not one: keep its channel, the rest of its words are the answer."""
        channel, body, after_channel = None, b"", False
        for mark, raw in self._items:
            if mark == CHANNEL:
                after_channel = True
            elif mark is None:
                if after_channel:
                    stripped = raw.lstrip()
                    word_end = next((i for i, c in enumerate(stripped) if chr(c).isspace()), len(stripped))
                    if word_end == len(stripped):  # the channel name continues in the next piece
                        channel = (channel or "") + stripped.decode("utf-8", "replace")
                        continue
                    channel = (channel or "") + stripped[:word_end].decode("utf-8", "replace")
                    raw, after_channel = stripped[word_end:], False
                body += raw
        role, words = (self._role or "").encode(), body.lstrip()
        if role and (words == role or words.startswith(role + b" ") or words.startswith(role + b"\t")):
            body = words[len(role):].lstrip()  # the author after a bare <|start|> is not text
        held, self._items, self._held, self._role = self._held, [], [], None
        self._state = "content"
        self._kind = "reasoning" if channel == "analysis" else "content"
        (self._reasoning if self._kind == "reasoning" else self._content).append("")
        return self._text(body, held)

    # --- text --------------------------------------------------------------------------------

    def _text(self, raw: bytes, positions: list[int]) -> list[Delta]:
        self._held += positions
        text = self._dec.decode(raw)
        if not text or self._kind == "ignore":
            if self._kind == "ignore":
                self._held = []
            return []
        held, self._held = self._held, []
        return [self._emit(text, held)]

    def _end_message(self) -> list[Delta]:
        text = self._dec.decode(b"", final=True)
        self._dec.reset()
        held, self._held = self._held, []
        kind, self._kind = self._kind, None
        if kind == "ignore" or not (text or held):
            return []
        self._kind = kind
        out = [self._emit(text, held)]
        self._kind = None
        return out

    def _emit(self, text: str, positions: list[int]) -> Delta:
        if self._kind == "tool":
            self._calls[-1]["args"].append(text)
            return Delta("tool_args", text, positions, index=len(self._calls) - 1)
        (self._reasoning if self._kind == "reasoning" else self._content).append(text)
        return Delta(self._kind or "content", text, positions)


def parse(tokens: list[int], tokenizer: Tokenizer, expect_header: bool = True) -> dict[str, Any]:
    """A completion's token ids -> an OpenAI-style assistant message ({"role", "content",
    "reasoning_content", "tool_calls"}; content and reasoning_content None when absent). Tool-call
    arguments are the raw text the model wrote, whether or not it is valid JSON."""
    parser = TokenParser(tokenizer, expect_header)
    for t in tokens:
        parser.feed(int(t))
    parser.finish()
    return parser.message()
