"""Turn a Hugging Face byte-level BPE tokenizer (tokenizer.json) into GGUF tokenizer metadata.

GGUF's `gpt2` tokenizer model stores the vocabulary as token strings in GPT-2 byte-to-unicode
form (the same strings tokenizer.json uses), one type per token (1 normal, 3 control = special added
token, 4 user-defined = non-special added token), and the merges as "left right" strings in rank
order. gpt-oss uses the o200k split pattern, which GGUF names pre-tokenizer `gpt-4o`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pyengine.errors import ModelLoadError

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4

# The o200k split pattern starts this way (tokenizer.json pre_tokenizer, tiktoken `_pat_str`).
_O200K_PATTERN_START = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"


@dataclass
class GGUFTokenizer:
    """Everything the converter writes under `tokenizer.*`."""
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def _split_patterns(pre_tokenizer: dict | None) -> list[str]:
    if not pre_tokenizer:
        return []
    if pre_tokenizer.get("type") == "Sequence":
        return [p for sub in pre_tokenizer.get("pretokenizers", []) for p in _split_patterns(sub)]
    if pre_tokenizer.get("type") == "Split":
        pattern = pre_tokenizer.get("pattern", {})
        return [pattern.get("Regex") or pattern.get("String") or ""]
    return []


def _token_content(value: object) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def read_chat_template(folder: Path, tokenizer_config: dict) -> str | None:
    """chat_template.jinja if present, else tokenizer_config.json's `chat_template` (a string, or a
    list of {name, template} of which the one named "default" is taken)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tmpl = tokenizer_config.get("chat_template")
    if isinstance(tmpl, list):
        named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
        tmpl = named.get("default")
    return tmpl if isinstance(tmpl, str) else None


def read_tokenizer(folder: str | Path, vocab_size: int, config: dict) -> GGUFTokenizer:
    """Read tokenizer.json (+ tokenizer_config.json, chat template) from an HF folder.

    The token list is padded to `vocab_size` (the embedding rows) with "[PAD<id>]" user-defined
    tokens, as llama.cpp's converter does. Special ids come from tokenizer_config.json
    (bos_token / eos_token / pad_token), else from config.json's *_token_id."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder}: no tokenizer.json")
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot read: {e}") from None
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise ModelLoadError(f"{path}: tokenizer model is {model.get('type')!r}, expected BPE")

    by_id: dict[int, tuple[str, int]] = {i: (s, TOKEN_NORMAL) for s, i in model["vocab"].items()}
    for added in tj.get("added_tokens", []):
        kind = TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    if max(by_id) >= vocab_size:
        raise ModelLoadError(f"{path}: token id {max(by_id)} does not fit vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        text, kind = by_id.get(i, (f"[PAD{i}]", TOKEN_USER_DEFINED))
        tokens.append(text)
        types.append(kind)

    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    patterns = _split_patterns(tj.get("pre_tokenizer"))
    if not any(p.startswith(_O200K_PATTERN_START) for p in patterns):
        raise ModelLoadError(f"{path}: pre-tokenizer is not the o200k split pattern gpt-oss uses")

    tc_path = folder / "tokenizer_config.json"
    tc: dict = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
    ids = {text: i for i, (text, _) in by_id.items()}

    def special(role: str) -> int | None:
        content = _token_content(tc.get(f"{role}_token"))
        if content is not None and content in ids:
            return ids[content]
        value = config.get(f"{role}_token_id")
        if isinstance(value, list):
            value = value[0] if value else None
        return value if isinstance(value, int) and 0 <= value < vocab_size else None

    return GGUFTokenizer(
        tokens=tokens, token_types=types, merges=merges, pre="gpt-4o",
        bos_id=special("bos"), eos_id=special("eos"), pad_id=special("pad"),
        add_bos=bool(tc.get("add_bos_token", False)), add_eos=bool(tc.get("add_eos_token", False)),
        chat_template=read_chat_template(folder, tc))
