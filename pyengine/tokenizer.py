"""Byte-level BPE tokenizer built from a GGUF file's own tokenizer metadata.

gpt-oss GGUFs store the o200k_harmony vocabulary as GPT-2 "byte-to-unicode" strings. We map them
back to bytes, use the token id as the BPE rank (the tiktoken rule: ranks 0..199997 are exactly the
o200k_base ranks), and hand the table to tiktoken's compiled BPE core with the o200k split pattern.
Decoding never goes through tiktoken: a plain id -> bytes table is enough and cannot panic.

BPE on one pre-tokenized piece grows faster than its length (a 3 MiB word without spaces: 5 s in
tiktoken 0.14 on a loaded machine, 1.4 s in chunks), so pieces longer than LONG_PIECE characters are encoded in LONG_PIECE-character chunks,
as fast tokenizers bound their work per word. Normal text has no such piece (the longest o200k
tokens are far shorter) and is encoded exactly as tiktoken does; only text holding a run of
LONG_PIECE characters is pre-tokenized here in Python, piece by piece.
"""

from __future__ import annotations

import codecs
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import regex
import tiktoken

from pyengine.errors import ModelLoadError

LONG_PIECE = 1024
# Every o200k piece is whitespace, or else whitespace-free but for one leading character and
# trailing newlines: a piece longer than LONG_PIECE implies one of these runs.
_LONG_RUN = re.compile(rf"[\S\r\n]{{{LONG_PIECE}}}|\s{{{LONG_PIECE + 1}}}")

# The o200k split pattern (tiktoken/bpe-openai `_pat_str` for o200k_base), one alternative per line.
O200K_PATTERN = "|".join(  # noqa: FLY002 - one alternative per line reads better
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

# llama.cpp pre-tokenizer names that mean the o200k pattern.
O200K_PRE_TYPES = frozenset({"gpt-4o", "llama4", "kanana2", "talkie"})
# Ollama writes pre = "default" for gpt-oss; the architecture implies o200k.
GPT_OSS_ARCHS = frozenset({"gpt-oss", "gptoss"})

TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

# Tokens that end generation (llama.cpp's EOG rule for these vocabularies): <|end|> is only an
# end-of-generation token when neither <|return|> nor <|call|> exists.
_EOG_TEXTS = ("<|endoftext|>", "<|return|>", "<|call|>", "<|eot_id|>", "<|im_end|>")


def _byte_decoder_table() -> dict[int, int | str]:
    """str.translate table: GPT-2 byte-to-unicode characters -> the latin-1 char of their byte.

    Printable bytes 33-126, 161-172, 174-255 stand for themselves; the other 68 bytes were shifted
    to U+0100 upward in byte order. Raw characters that the encoding never produces are mapped to
    U+FFFF so that the following latin-1 encode fails loudly.
    """
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    shifted = [b for b in range(256) if b not in set(printable)]
    table: dict[int, int | str] = {}
    for n, b in enumerate(shifted):
        table[256 + n] = b
        table[b] = "\uffff"
    return table


_BYTE_DECODER = _byte_decoder_table()


def token_text_to_bytes(text: str) -> bytes:
    """Bytes of a normal token stored in GPT-2 byte-to-unicode form; ValueError if not that form."""
    try:
        return text.translate(_BYTE_DECODER).encode("latin-1")
    except UnicodeEncodeError as e:
        raise ValueError(f"token {text!r} is not in GPT-2 byte-level form") from e


class StreamingDetokenizer:
    """Turns token ids into text one at a time without ever emitting a broken UTF-8 sequence.

    Incomplete multi-byte sequences are held back until the bytes that complete them arrive;
    bytes that can never become valid UTF-8 become U+FFFD (as openai-harmony does).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        """Feed one token id; returns the text that became complete (possibly empty)."""
        if self._skip_special and self._tokenizer.is_special(token_id):
            return ""
        return self._decoder.decode(self._tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        """Text for any held-back bytes (U+FFFD for an unfinished sequence); resets the state."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text


class Tokenizer:
    """o200k-style byte-level BPE over a GGUF vocabulary (encode, decode, special tokens)."""

    def __init__(
        self,
        pieces: Sequence[bytes],
        ranks: Mapping[bytes, int],
        special_tokens: Mapping[str, int],
        pattern: str,
        bos_id: int | None,
        eos_id: int | None,
        eog_ids: Iterable[int],
    ) -> None:
        self._pieces = list(pieces)
        self.n_vocab = len(self._pieces)
        self.special_tokens = dict(special_tokens)
        self._special_ids = frozenset(self.special_tokens.values())
        names = sorted(self.special_tokens, key=len, reverse=True)  # the longest spelling wins
        self._special_split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
        self.pattern = pattern
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.eog_ids = frozenset(eog_ids)
        self._encoding = tiktoken.Encoding(
            "gguf-bpe", pat_str=pattern, mergeable_ranks=dict(ranks), special_tokens=self.special_tokens
        )

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF metadata (tokenizer.ggml.* keys); raises ModelLoadError if unsupported."""
        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ModelLoadError(f"tokenizer model {model!r} is not supported (only byte-level BPE 'gpt2')")
        pattern = _pattern_for(metadata)
        tokens = metadata.get("tokenizer.ggml.tokens")
        if tokens is None or len(tokens) == 0:
            raise ModelLoadError("the file has no tokenizer.ggml.tokens")
        types = metadata.get("tokenizer.ggml.token_type")
        if types is None:
            types = [TOKEN_NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise ModelLoadError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")

        pieces: list[bytes] = []
        ranks: dict[bytes, int] = {}
        special: dict[str, int] = {}
        for token_id, (text, kind) in enumerate(zip(tokens, types)):
            kind = int(kind)
            if isinstance(text, bytes):
                text = text.decode("utf-8")
            if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
                piece = text.encode("utf-8")
                special.setdefault(text, token_id)
            else:
                try:
                    piece = token_text_to_bytes(text)
                except ValueError as e:
                    raise ModelLoadError(f"token {token_id}: {e}") from None
                if kind == TOKEN_NORMAL:
                    ranks.setdefault(piece, token_id)
            pieces.append(piece)
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise ModelLoadError(f"the vocabulary lacks {len(missing)} single-byte tokens (e.g. byte {missing[0]})")
        # A user-defined token spelled like a normal token would be ambiguous to tiktoken: it stays normal.
        special = {t: i for t, i in special.items() if t.encode("utf-8") not in ranks}

        bos_id = _optional_id(metadata, "tokenizer.ggml.bos_token_id", len(pieces))
        eos_id = _optional_id(metadata, "tokenizer.ggml.eos_token_id", len(pieces))
        eog = {eos_id} if eos_id is not None else set()
        eog.update(int(i) for i in metadata.get("tokenizer.ggml.eos_token_ids", []) if 0 <= int(i) < len(pieces))
        eog.update(special[t] for t in _EOG_TEXTS if t in special)
        if "<|end|>" in special and "<|return|>" not in special and "<|call|>" not in special:
            eog.add(special["<|end|>"])
        return cls(pieces, ranks, special, pattern, bos_id, eos_id, eog)

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The tiktoken Encoding over this vocabulary (ranks = token ids; pyengine.constrain
        builds its grammar engine's token table from it)."""
        return self._encoding

    def encode(self, text: str, special: bool = False, add_bos: bool = False) -> list[int]:
        """Token ids of text; special=True turns control-token spellings into their ids."""
        if _LONG_RUN.search(text):
            ids = self._encode_long(text, special)
        elif special:
            ids = self._encoding.encode(text, allowed_special="all")
        else:
            ids = self._encoding.encode_ordinary(text)
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def _encode_long(self, text: str, special: bool) -> list[int]:
        """encode() for text with a long run: tiktoken's pieces, each BPE'd alone, long ones in chunks."""
        ids: list[int] = []
        parts = self._special_split.split(text) if special and self._special_split else [text]
        for n, part in enumerate(parts):
            if n % 2:  # split() puts the matched special tokens at the odd places
                ids.append(self.special_tokens[part])
                continue
            for m in _pieces_re(self.pattern).finditer(part):
                piece = m.group()
                for i in range(0, len(piece), LONG_PIECE):
                    ids += self._encoding._encode_single_piece(piece[i:i + LONG_PIECE])
        return ids

    def token_id(self, text: str) -> int:
        """Id of a special token by its spelling, e.g. '<|start|>'; KeyError if absent."""
        return self.special_tokens[text]

    def is_special(self, token_id: int) -> bool:
        """True for control and user-defined tokens."""
        return token_id in self._special_ids

    def token_to_piece(self, token_id: int) -> bytes:
        """The raw bytes of one token (control tokens: their spelling)."""
        self._check_ids([token_id])
        return self._pieces[token_id]

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        """Concatenated token bytes; skip_special drops control/user-defined tokens."""
        ids = list(ids)
        self._check_ids(ids)
        if skip_special:
            ids = [i for i in ids if i not in self._special_ids]
        return b"".join([self._pieces[i] for i in ids])

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ids; invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def streaming_detokenizer(self, skip_special: bool = False) -> StreamingDetokenizer:
        """A fresh incremental detokenizer over this vocabulary."""
        return StreamingDetokenizer(self, skip_special)

    def _check_ids(self, ids: Sequence[int]) -> None:
        n = self.n_vocab
        for i in ids:
            if not 0 <= i < n:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{n - 1})")


@functools.lru_cache(maxsize=4)
def _pieces_re(pattern: str) -> regex.Pattern[str]:
    return regex.compile(pattern)


def _pattern_for(metadata: Mapping[str, Any]) -> str:
    pre = metadata.get("tokenizer.ggml.pre", "default")
    arch = metadata.get("general.architecture")
    if pre in O200K_PRE_TYPES or (pre == "default" and arch in GPT_OSS_ARCHS):
        return O200K_PATTERN
    raise ModelLoadError(
        f"tokenizer pre-type {pre!r} (architecture {arch!r}) is not supported; "
        f"known: {', '.join(sorted(O200K_PRE_TYPES))}, or 'default' for gpt-oss"
    )


def _optional_id(metadata: Mapping[str, Any], key: str, n_vocab: int) -> int | None:
    value = metadata.get(key)
    if value is None:
        return None
    value = int(value)
    if not 0 <= value < n_vocab:
        raise ModelLoadError(f"{key} = {value} is outside the vocabulary (0..{n_vocab - 1})")
    return value
