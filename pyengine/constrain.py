"""Constrained decoding: a token mask that makes the answer follow a JSON schema or a grammar.

Why a mask: a model asked for JSON may still write something else; structured output is a
guarantee only when every token that would break the grammar cannot be drawn. The mask comes from
llguidance (the grammar engine llama.cpp uses; bench/constrain_mask.py measures it against
xgrammar and outlines-core on the 201k o200k vocabulary) and reaches the sampler as one boolean
vector over the vocabulary (Sampler.sample(mask=...)).

What is masked: gpt-oss writes Harmony messages, and only the answer (the `final` channel) and
tool-call arguments are constrained; the reasoning (`analysis`) is never masked. The message
headers are forced to the few spellings the request allows (reasoning, the answer, or a call to
a function the request lets it call), so a model cannot slip out of the constraint by writing its
answer without a header or in another channel. A raw completion has no channels: all its text is
the answer.

`request_spec` turns a request's fields (response_format, grammar, json_schema, tools,
tool_choice) into a checked `Spec`, or None when nothing is constrained; an invalid schema or
grammar is a SpecError (a ValueError) carrying the parser's message. `Constraint` is one sequence's position in
a Spec: `allowed()` before each draw, `advance(token)` after it."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import llguidance
import numpy as np
from llguidance.tiktoken import lltokenizer_from_encoding

from pyengine.harmony import CALL, CHANNEL, CONSTRAIN, END, MESSAGE, RETURN, START
from pyengine.tokenizer import Tokenizer

# JSON is written with one space after "," and ":" (how models are used to seeing it) and no
# other whitespace, so a model cannot wander off into unbounded blank space inside the answer.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
TOOL_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # spellable in a Harmony header (OpenAI's rule, plus ".")


@dataclass(frozen=True)
class Spec:
    """What a request constrains. answer: llguidance grammar of the answer (None: the request
    asks for no answer format). tools: the functions the model may call -> grammar of their
    arguments. require_tool: the reply must be one of those calls."""

    answer: str | None = None
    tools: Mapping[str, str] = field(default_factory=dict)
    require_tool: bool = False


class Vocab:
    """One tokenizer's tables for masking: llguidance's token table (about 2 s to build for
    o200k, so built once per tokenizer) and the control-token ids (never part of constrained text)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        eos = tokenizer.eos_id if tokenizer.eos_id is not None else max(tokenizer.eog_ids, default=0)
        self.ll = lltokenizer_from_encoding(tokenizer.encoding, n_vocab=tokenizer.n_vocab, eos_token=eos)
        self.control = np.array(sorted({*tokenizer.special_tokens.values(), eos}), dtype=np.int64)


_vocabs: weakref.WeakKeyDictionary[Tokenizer, Vocab] = weakref.WeakKeyDictionary()
_vocab_lock = threading.Lock()


def vocab_for(tokenizer: Tokenizer) -> Vocab:
    """The Vocab of `tokenizer` (built on first use, then shared)."""
    with _vocab_lock:
        v = _vocabs.get(tokenizer)
        if v is None:
            v = _vocabs[tokenizer] = Vocab(tokenizer)
        return v


# --- requests -> Spec --------------------------------------------------------------------------


def schema_grammar(schema: Any, what: str = "json_schema") -> str:
    """llguidance grammar of a JSON schema (a dict, a JSON string, or true/false)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} is not valid JSON: {e}") from None
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, Mapping):
        raise ValueError(f"{what} must be a JSON schema (an object)")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise ValueError(f"invalid {what}: {e}") from None


def gbnf_grammar(text: Any) -> str:
    """llguidance grammar of a GBNF grammar (llama.cpp's format; Lark is accepted too), given as
    text or as llama-cpp-python's LlamaGrammar (which keeps its text in `_grammar`)."""
    text = getattr(text, "_grammar", text)
    if not isinstance(text, str) or not text.strip():
        raise ValueError("grammar must be a non-empty GBNF string")
    try:
        return llguidance.grammar_from("gbnf", text)
    except Exception as e:  # noqa: BLE001 - the converter raises plain Exception for unknown rules
        raise ValueError(f"invalid grammar: {str(e).removeprefix('Failed to convert the grammar from GBNF to Lark: ')}"
                         ) from None


def response_format_schema(response_format: Any) -> Any | None:
    """The JSON schema a response_format asks for (None for text), read as llama-server reads it:
    json_object takes an optional `schema` (default: any object), json_schema takes
    `json_schema.schema` (default: any JSON value)."""
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise ValueError("response_format must be an object")
    inner = response_format.get("json_schema", {})
    if not isinstance(inner, Mapping):
        raise ValueError("response_format.json_schema must be an object ({\"name\": ..., \"schema\": {...}})")
    for where, holder in (("response_format.schema", response_format), ("response_format.json_schema.schema", inner)):
        if "schema" in holder and not isinstance(holder["schema"], (Mapping, bool)):
            raise ValueError(f"{where} must be a JSON schema (an object)")
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return response_format.get("schema", {"type": "object"})
    if kind == "json_schema":
        return inner.get("schema", {})
    raise ValueError(f"response_format type {kind!r} is not supported (text, json_object or json_schema)")


def _tool_table(tools: Iterable[Mapping[str, Any]] | None) -> dict[str, Any]:
    """name -> parameters schema of OpenAI tools ({"type": "function", "function": {...}}) or of
    bare function definitions ({"name", "parameters"})."""
    out: dict[str, Any] = {}
    for t in tools or []:
        fn = t.get("function", t) if isinstance(t, Mapping) else None
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if not isinstance(name, str):
            raise ValueError("every tool needs a function name")
        out[name] = fn.get("parameters") or {"type": "object"}
    return out


def _chosen(tool_choice: Any, names: Iterable[str]) -> tuple[list[str], bool]:
    """(callable function names, whether a call is required) for a tool_choice."""
    names = list(names)
    if tool_choice is None or tool_choice == "auto":
        return names, False
    if tool_choice == "none":
        return [], False
    if tool_choice == "required":
        if not names:
            raise ValueError("tool_choice 'required' needs tools")
        return names, True
    if isinstance(tool_choice, Mapping):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise ValueError("tool_choice must be none, auto, required or {\"type\": \"function\", "
                             "\"function\": {\"name\": ...}}")
        if name not in names:
            raise ValueError(f"tool_choice names function {name!r}, which is not among the tools")
        return [name], True
    raise ValueError("tool_choice must be none, auto, required or a function object")


def _check(grammar: str, what: str, vocab: Vocab) -> str:
    error = llguidance.LLMatcher.validate_grammar(grammar, vocab.ll)
    if error:
        raise ValueError(f"invalid {what}: {error}")
    return grammar


class SpecError(ValueError):
    """An invalid constraint; `param` names the request field at fault."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def request_spec(tokenizer: Tokenizer, *, response_format: Any = None, grammar: Any = None,
                 json_schema: Any = None, tools: Iterable[Mapping[str, Any]] | None = None,
                 tool_choice: Any = None) -> Spec | None:
    """The checked Spec of a request's fields, or None when they constrain nothing (no format,
    and tool calls optional). At most one of response_format (json), grammar and json_schema.
    SpecError (a ValueError) with the parser's message for an invalid schema or grammar."""
    with _blame("response_format"):
        rf_schema = response_format_schema(response_format)
    given = [k for k, v in (("response_format", rf_schema), ("grammar", grammar), ("json_schema", json_schema))
             if v is not None]
    if len(given) > 1:
        raise SpecError(f"give only one of {', '.join(given)}", given[-1])
    with _blame("tools"):
        table = _tool_table(tools)
    with _blame("tool_choice"):
        names, required = _chosen(tool_choice, table)
    if not given and not required:
        return None
    vocab = vocab_for(tokenizer)
    answer = None
    with _blame(given[0] if given else "tools"):
        if rf_schema is not None:
            answer = _check(schema_grammar(rf_schema, "response_format schema"), "response_format schema", vocab)
        elif json_schema is not None:
            answer = _check(schema_grammar(json_schema), "json_schema", vocab)
        elif grammar is not None:
            answer = _check(gbnf_grammar(grammar), "grammar", vocab)
    calls = {}
    with _blame("tools"):
        for name in names:
            if not TOOL_NAME.fullmatch(name):
                raise ValueError(f"tool name {name!r} must be 1-64 letters, digits, '_', '-' or '.'")
            what = f"parameters of tool {name!r}"
            calls[name] = _check(schema_grammar(table[name], what), what, vocab)
    return Spec(answer, calls, required)


@contextlib.contextmanager
def _blame(param: str) -> Iterator[None]:
    """A ValueError raised inside becomes a SpecError naming `param`."""
    try:
        yield
    except SpecError:
        raise
    except ValueError as e:
        raise SpecError(str(e), param) from None


# --- one sequence ------------------------------------------------------------------------------


class Constraint:
    """Where one sequence stands in a Spec. chat: the output is Harmony and starts inside the
    assistant's first header (the prompt ends with `<|start|>assistant`); else all of it is the
    answer, ended by one of `eog`. n_logits: the length of the logit vectors masked."""

    def __init__(self, spec: Spec, tokenizer: Tokenizer, n_logits: int, chat: bool, eog: Iterable[int]) -> None:
        self.spec, self.vocab, self.n = spec, vocab_for(tokenizer), n_logits
        self.tokenizer = tokenizer
        self.matcher: llguidance.LLMatcher | None = None
        self.terminators: list[int] = []
        self.headers: list[tuple[list[int], tuple[str, int] | None]] | None = None
        self.prefix: list[int] = []
        self.free = False  # inside reasoning: nothing is masked
        self.done = False
        sp = tokenizer.special_tokens
        self.end, self.start, self.channel = sp.get(END), sp.get(START), sp.get(CHANNEL)
        if chat:
            self._expect_header(between=False)
        elif spec.answer is None:
            raise ValueError("a text completion can be constrained only by a format (tools need a chat)")
        else:  # ended by end-of-generation; not by <|call|>, which would make it a tool call
            ends = set(eog) - {sp.get(CALL)}
            self._begin_body((spec.answer, -1), sorted(ends or eog))

    # --- states -------------------------------------------------------------------------------

    def _expect_header(self, between: bool) -> None:
        """The next tokens spell one allowed header: reasoning, the answer, or an allowed call
        (`<|start|>assistant` first when a message ended)."""
        head = f"{START}assistant" if between else ""
        sp = self.tokenizer.special_tokens
        options: list[tuple[str, tuple[str, int] | None]] = [(f"{CHANNEL}analysis{MESSAGE}", None)]
        if self.spec.answer is not None and not self.spec.require_tool:
            options.append((f"{CHANNEL}final{MESSAGE}", (self.spec.answer, sp[RETURN])))
        for name, g in self.spec.tools.items():
            options.append((f"{CHANNEL}commentary to=functions.{name} {CONSTRAIN}json{MESSAGE}", (g, sp[CALL])))
        self.headers = [(self.tokenizer.encode(head + text, special=True), body) for text, body in options]
        self.prefix, self.free = [], False

    def _begin_body(self, body: tuple[str, int], terminators: list[int]) -> None:
        grammar, term = body
        self.matcher = llguidance.LLMatcher(self.vocab.ll, grammar)
        if self.matcher.is_error():
            raise ValueError(f"invalid grammar: {self.matcher.get_error()}")
        self.terminators = [term] if term >= 0 else terminators

    # --- per token ----------------------------------------------------------------------------

    def allowed(self) -> np.ndarray | None:
        """Boolean mask of the tokens that may come next, or None when nothing is masked."""
        if self.free or self.done:
            return None
        mask = np.zeros(self.n, dtype=bool)
        if self.headers is not None:
            k = len(self.prefix)
            mask[[t[k] for t, _ in self.headers]] = True
            return mask
        m = self.matcher
        if not m.is_stopped():
            bits = np.frombuffer(m.compute_bitmask(), dtype=np.uint8)
            words = np.unpackbits(bits, bitorder="little", count=min(self.n, bits.size * 8)).view(bool)
            mask[:words.size] = words
            mask[self.vocab.control[self.vocab.control < self.n]] = False
        if m.is_error():
            raise RuntimeError(f"constrained decoding failed: {m.get_error()}")
        if m.is_accepting():
            mask[self.terminators] = True
        if not mask.any():
            raise RuntimeError("constrained decoding: the grammar allows no next token")
        return mask

    def advance(self, token: int) -> None:
        """The sequence drew `token` (from the mask allowed() gave, when it gave one)."""
        if self.done:
            return
        if self.free:
            if token == self.end:
                self._expect_header(between=True)
            elif token in (self.start, self.channel):  # a new header without <|end|>, as the parser reads it
                self._expect_header(between=token == self.start)
                self._header_token(token)
            return
        if self.headers is not None:
            self._header_token(token)
            return
        if token in self.terminators:
            self.done = True
        elif not self.matcher.consume_token(token):
            raise RuntimeError(f"constrained decoding failed: {self.matcher.get_error()}")

    def _header_token(self, token: int) -> None:
        k = len(self.prefix)
        self.prefix.append(token)
        self.headers = [(t, body) for t, body in self.headers if t[k] == token]
        if not self.headers:
            raise RuntimeError(f"constrained decoding: token {token} is not part of an allowed header")
        complete = [body for t, body in self.headers if len(t) == len(self.prefix)]
        if complete:
            self.headers = None
            if complete[0] is None:
                self.free = True
            else:
                self._begin_body(complete[0], [])

