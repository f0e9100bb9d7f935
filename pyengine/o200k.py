"""The o200k_harmony vocabulary as a gpt-oss GGUF stores it, built offline from bpe-openai.

bpe-openai ships OpenAI's o200k_base ranks (199,998 byte strings) inside the package, so no
download is needed. A gpt-oss GGUF (`tokenizer.ggml.model = gpt2`) stores them as GPT-2
byte-to-unicode token strings, with token type 1 (normal), followed by the harmony special tokens at
199998..201087 (type 3, control; the unnamed ones are `<|reserved_N|>`), and the BPE merges derived
from the ranks in the order Hugging Face's TikTokenConverter writes them.
"""

from __future__ import annotations

import functools

from pyengine.hf_tokenizer import TOKEN_CONTROL, TOKEN_NORMAL, GGUFTokenizer

N_VOCAB = 201088
N_BASE = 199998
BOS_ID, PAD_ID, EOS_ID = 199998, 199999, 200002

# gpt-oss special tokens (docs/gpt-oss.md); every other id from 199998 up is reserved.
HARMONY_SPECIALS = {
    199998: "<|startoftext|>",
    199999: "<|endoftext|>",
    200002: "<|return|>",
    200003: "<|constrain|>",
    200005: "<|channel|>",
    200006: "<|start|>",
    200007: "<|end|>",
    200008: "<|message|>",
    200012: "<|call|>",
    200018: "<|endofprompt|>",
}


def _byte_to_unicode() -> dict[int, str]:
    # GPT-2's table: printable Latin-1 bytes map to themselves, the rest to U+0100 upwards in order
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_TO_UNICODE = _byte_to_unicode()


def to_gpt2_text(piece: bytes) -> str:
    """A token's bytes as the GPT-2 byte-to-unicode string GGUF stores."""
    return "".join(BYTE_TO_UNICODE[b] for b in piece)


@functools.lru_cache(maxsize=1)
def o200k_ranks() -> dict[bytes, int]:
    """o200k_base: token bytes -> rank (= token id), 199,998 entries."""
    import bpe_openai

    return dict(bpe_openai.get_encoding("o200k_base")._mergeable_ranks)


@functools.lru_cache(maxsize=1)
def o200k_pattern() -> str:
    """The o200k pre-tokenizer split regex (GGUF pre-tokenizer `gpt-4o`)."""
    import bpe_openai

    return bpe_openai.get_encoding("o200k_base")._pat_str


def special_token_text(token_id: int) -> str:
    return HARMONY_SPECIALS.get(token_id, f"<|reserved_{token_id}|>")


def harmony_specials() -> dict[str, int]:
    """Every special token text (named and reserved) -> id, 199998..201087."""
    return {special_token_text(i): i for i in range(N_BASE, N_VOCAB)}


def merges_from_ranks(ranks: dict[bytes, int]) -> list[str]:
    """Merge rules in priority order, derived from ranks the way HF's TikTokenConverter does it.

    For each token (in rank order) every split into two tokens is a merge; merges are ordered by
    the merged token's rank, then by the ranks of the two halves.
    """
    merges: list[tuple[int, int, int, str]] = []
    for piece, rank in ranks.items():
        if len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            lr, rr = ranks.get(left), ranks.get(right)
            if lr is not None and rr is not None:
                merges.append((rank, lr, rr, f"{to_gpt2_text(left)} {to_gpt2_text(right)}"))
    merges.sort()
    return [m[3] for m in merges]


@functools.lru_cache(maxsize=1)
def tokens() -> tuple[str, ...]:
    """All 201,088 token strings, indexed by id."""
    out = [""] * N_VOCAB
    for piece, rank in o200k_ranks().items():
        out[rank] = to_gpt2_text(piece)
    for i in range(N_BASE, N_VOCAB):
        out[i] = special_token_text(i)
    return tuple(out)


def token_types() -> list[int]:
    """1 (normal) for the o200k_base ids, 3 (control) for the harmony specials and reserved ids."""
    return [TOKEN_NORMAL] * N_BASE + [TOKEN_CONTROL] * (N_VOCAB - N_BASE)


@functools.lru_cache(maxsize=1)
def merges() -> tuple[str, ...]:
    """The 446,189 merges (about 1 s to derive; cached for the process)."""
    return tuple(merges_from_ranks(o200k_ranks()))


def gguf_tokenizer(chat_template: str | None = None) -> GGUFTokenizer:
    """The `tokenizer.*` content of a gpt-oss GGUF as the converter writes it from openai/gpt-oss-*:
    bos <|startoftext|>, eos <|return|>, pad <|endoftext|>, no BOS/EOS added."""
    return GGUFTokenizer(tokens=list(tokens()), token_types=token_types(), merges=list(merges()),
                         pre="gpt-4o", bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
                         add_bos=False, add_eos=False, chat_template=chat_template)
