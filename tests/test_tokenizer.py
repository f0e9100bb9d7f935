"""Tokenizer from GGUF metadata vs the o200k references (bpe-openai, tiktoken on bpe-openai's ranks)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import regex
import vocab

from pyengine.errors import ModelLoadError
from pyengine.tokenizer import _LONG_RUN, LONG_PIECE, Tokenizer, token_text_to_bytes

bpe_openai = pytest.importorskip("bpe_openai")
tiktoken = pytest.importorskip("tiktoken")

VOCAB_DATA = Path(__file__).resolve().parents[2] / "shared" / "vendor-data" / "llama.cpp-vocab"
SEPARATOR = "\n__ggml_vocab_test__\n"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_metadata(vocab.harmony_metadata())


@pytest.fixture(scope="module")
def harmony_encoding(tmp_path_factory):
    pytest.importorskip("openai_harmony")
    return vocab.load_harmony_encoding(tmp_path_factory.mktemp("tiktoken"))


@pytest.fixture(scope="module")
def ref_bpe():
    return bpe_openai.get_encoding("o200k_base")


@pytest.fixture(scope="module")
def ref_tiktoken():
    return tiktoken.Encoding(
        "o200k_ref", pat_str=vocab.o200k_pattern(), mergeable_ranks=vocab.o200k_ranks(), special_tokens={}
    )


def inp_cases(name: str) -> list[str]:
    path = VOCAB_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent")
    cases = path.read_text(encoding="utf-8").split(SEPARATOR)
    if cases and cases[-1] == "":
        cases.pop()
    return cases


# Character pools for random strings: scripts, marks, emoji, digits, odd whitespace.
POOLS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789",
    "٠١٢٣٤٥٦٧٨٩०१२३½²³ⅫⅣ",
    " !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "      \t\n\r\u00a0\u2009\u3000\u200b\u2028\x0b\x0c",
    "'s 't 're 've 'm 'll 'd 'S 'T 'RE",
    "àáâãäåæçèéêëìíîïðñòóôõöøùúûüýþÿÀÁÂÃÄÅÆÇÈÉÊËÌÍÎÏ",
    "\u0300\u0301\u0302\u0303\u0308\u0323\u0327\u034f\u0361",
    "абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВГДЕЁЖЗИЙ",
    "αβγδεζηθικλμνξοπρστυφχψωΑΒΓΔ",
    "的一是不了在人有我他这个们中来上大为和国地到以说时要就出会可也你对生能而子那得于着下自之年",
    "あいうえおかきくけこアイウエオカキクケコー",
    "가나다라마바사아자차카타파하한국어",
    "ابتثجحخدذرزسشصضطظعغفقكلمنهوي",
    "कखगघङचछजझञटठडढणतथदधनपफबभमयरलवशषसह\u093e\u093f\u0940\u094d",
    "กขฃคฅฆงจฉชซฌญฎฏฐฑฒณดตถทธนบปผฝพฟภมยรลวศษสหฬอฮ\u0e31\u0e34\u0e35\u0e48\u0e49",
    "ខ្មែរ\u17b6\u17b7\u17d2",
    "😀😁😂🤣😃👍👍🏽👨\u200d👩\u200d👧\u200d👦🏳️\u200d🌈❤️\ufe0f🇺🇸🇫🇷",
    "<|start|><|end|><|message|>",
]


def random_strings(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(0, 60)
        chars = []
        while len(chars) < length:
            if rng.random() < 0.1:
                # Any non-surrogate code point, BMP or astral.
                cp = rng.choice([rng.randint(0x20, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])
                chars.append(chr(cp))
            else:
                pool = rng.choice(POOLS)
                run = rng.randint(1, 8)
                chars.extend(rng.choice(pool) for _ in range(run))
        out.append("".join(chars))
    return out


@pytest.mark.parametrize("name", ["ggml-vocab-gpt-2.gguf.inp", "ggml-vocab-qwen35.gguf.inp"])
def test_llama_cpp_inputs_match_o200k_references(tok, ref_bpe, ref_tiktoken, name):
    cases = inp_cases(name)
    assert len(cases) >= 40
    for text in cases:
        ids = tok.encode(text)
        assert ids == ref_bpe.encode_ordinary(text), repr(text)
        assert ids == ref_tiktoken.encode_ordinary(text), repr(text)
        assert tok.decode(ids) == text


def test_random_unicode_matches_o200k_references(tok, ref_bpe, ref_tiktoken):
    texts = random_strings(2500, seed=1234)
    n_tokens = 0
    for text in texts:
        ids = tok.encode(text)
        n_tokens += len(ids)
        assert ids == ref_bpe.encode_ordinary(text), repr(text)
        assert ids == ref_tiktoken.encode_ordinary(text), repr(text)
        assert tok.decode(ids) == text
    assert n_tokens > 20000


def test_matches_openai_harmony_encoder(tok, harmony_encoding):
    texts = random_strings(300, seed=99) + ["<|start|>assistant<|channel|>final<|message|>hi<|return|>"]
    for text in texts:
        assert tok.encode(text) == harmony_encoding.encode(text, disallowed_special=()), repr(text)
        assert tok.encode(text, special=True) == harmony_encoding.encode(text, allowed_special="all"), repr(text)


def test_special_tokens_only_when_asked(tok):
    text = "<|start|>user<|message|>hi<|end|>"
    assert tok.encode(text, special=True) == [200006, *tok.encode("user"), 200008, *tok.encode("hi"), 200007]
    plain = tok.encode(text)
    assert not any(tok.is_special(i) for i in plain)
    assert tok.decode(plain) == text
    assert tok.decode(tok.encode(text, special=True)) == text
    assert tok.decode(tok.encode(text, special=True), skip_special=True) == "userhi"
    assert tok.encode("hi", add_bos=True)[0] == 199998


def test_ids_and_pieces(tok):
    assert tok.n_vocab == 201088
    assert (tok.bos_id, tok.eos_id) == (199998, 200002)
    assert tok.eog_ids == {199999, 200002, 200012}
    assert tok.token_id("<|call|>") == 200012
    assert tok.token_to_piece(200005) == b"<|channel|>"
    ranks = vocab.o200k_ranks()
    rng = random.Random(5)
    for piece in rng.sample(sorted(ranks), 500):
        assert tok.token_to_piece(ranks[piece]) == piece
    with pytest.raises(ValueError):
        tok.decode([201088])
    with pytest.raises(ValueError):
        tok.decode([-1])


def test_ollama_default_pre_on_gptoss_is_o200k(tok):
    ollama = Tokenizer.from_metadata(vocab.harmony_metadata(pre="default", arch="gptoss"))
    assert ollama.eos_id == 199999
    assert ollama.eog_ids == {199999, 200002, 200012}
    for text in random_strings(200, seed=7):
        assert ollama.encode(text) == tok.encode(text)


def test_unsupported_metadata_is_a_load_error():
    meta = dict(vocab.harmony_metadata())
    with pytest.raises(ModelLoadError, match="pre-type"):
        Tokenizer.from_metadata({**meta, "tokenizer.ggml.pre": "default", "general.architecture": "llama"})
    with pytest.raises(ModelLoadError, match="not supported"):
        Tokenizer.from_metadata({**meta, "tokenizer.ggml.model": "llama"})
    tokens = list(meta["tokenizer.ggml.tokens"])
    tokens[5] = "a b"  # a raw space is never in GPT-2 byte-level form
    with pytest.raises(ModelLoadError, match="token 5"):
        Tokenizer.from_metadata({**meta, "tokenizer.ggml.tokens": tokens})
    with pytest.raises(ModelLoadError, match="token_type"):
        Tokenizer.from_metadata({**meta, "tokenizer.ggml.token_type": [1, 1]})


def test_byte_level_form_round_trip():
    for b in range(256):
        assert token_text_to_bytes(vocab.to_gpt2_text(bytes([b]))) == bytes([b])
    assert token_text_to_bytes("Ġworld") == b" world"
    assert token_text_to_bytes("Ċ") == b"\n"


def test_streaming_detokenizer_never_splits_utf8(tok):
    for text in random_strings(300, seed=3) + ["😀👨\u200d👩\u200d👧 नमस्ते"]:
        ids = tok.encode(text)
        det = tok.streaming_detokenizer()
        parts = [det.add(i) for i in ids]
        parts.append(det.flush())
        assert "".join(parts) == text
        assert all("\ufffd" not in p for p in parts)
        # Each emitted piece is exactly the UTF-8 prefix completed so far.
        emitted = ""
        data = tok.decode_bytes(ids)
        for i, p in enumerate(parts[:-1]):
            emitted += p
            prefix = tok.decode_bytes(ids[: i + 1])
            assert data.startswith(emitted.encode())
            assert len(prefix) - len(emitted.encode()) < 4


def test_streaming_detokenizer_invalid_and_partial_bytes(tok):
    ranks = vocab.o200k_ranks()
    e2, x82, xff = ranks[b"\xe2"], ranks[b"\x82"], ranks[b"\xff"]
    det = tok.streaming_detokenizer()
    assert det.add(e2) == ""
    assert det.add(x82) == ""
    assert det.flush() == "\ufffd"
    assert det.add(xff) == "\ufffd"
    assert det.add(e2) == ""
    assert det.add(x82) == ""
    assert det.add(ranks[b"\xac"]) == "€"
    skipping = tok.streaming_detokenizer(skip_special=True)
    assert skipping.add(200006) == ""
    assert tok.streaming_detokenizer().add(200006) == "<|start|>"


def test_vocab_gguf_round_trip(tmp_path):
    """A vocab-only GGUF written by gguf-py (merges included), read back, gives the same tokenizer."""
    pytest.importorskip("gguf")
    path = vocab.write_vocab_gguf(tmp_path / "ggml-vocab-o200k-harmony.gguf", pre="default", arch="gptoss")
    meta = vocab.read_gguf_metadata(path)
    assert len(meta["tokenizer.ggml.merges"]) == 446189
    tokens = set(meta["tokenizer.ggml.tokens"])
    assert all(m.replace(" ", "") in tokens for m in meta["tokenizer.ggml.merges"][::997])
    from_file = Tokenizer.from_metadata(meta)
    ref = bpe_openai.get_encoding("o200k_base")
    for text in random_strings(100, seed=11):
        assert from_file.encode(text) == ref.encode_ordinary(text)


def test_throughput_sanity(tok):
    """Measured number goes to docs/tokenizer.md; the bound here only catches a pathological slowdown."""
    text = " ".join(random_strings(400, seed=21)) + inp_cases("ggml-vocab-qwen35.gguf.inp")[-1]
    text = text * 4
    start = time.perf_counter()
    n = len(tok.encode(text))
    rate = n / (time.perf_counter() - start)
    print(f"encode: {n} tokens at {rate / 1e6:.2f} M tokens/s")
    assert rate > 1e5


def test_text_with_long_runs_but_normal_pieces_matches_o200k_references(tok, ref_bpe, ref_tiktoken):
    """Text with runs of LONG_PIECE non-space characters takes the piece-by-piece path, which must
    give tiktoken's and bpe-openai's tokens as long as no single piece is longer than LONG_PIECE."""
    rng = random.Random(5)
    for seed in range(6):
        words = [s for s in random_strings(200, seed=seed) if s]
        text = "".join("".join(w.split()) + (" " if rng.random() < 0.05 else "") for w in words)
        assert _LONG_RUN.search(text), "the test text must take the long-run path"
        assert max(len(p) for p in regex.findall(vocab.o200k_pattern(), text)) <= LONG_PIECE
        ids = tok.encode(text)
        assert ids == ref_bpe.encode_ordinary(text) == ref_tiktoken.encode_ordinary(text)
        assert tok.decode(ids) == text


@pytest.mark.parametrize("n_chunks", [1, 3, 40])
def test_a_long_word_is_encoded_in_bounded_chunks(tok, ref_bpe, n_chunks):
    """A piece longer than LONG_PIECE is encoded as its LONG_PIECE-character chunks (each one o200k
    piece of lowercase letters), so the work per word is linear in its length."""
    rng = random.Random(n_chunks)
    word = " " + "".join(rng.choice("abcdefghijklmnopqrstuvwxyzäöü") for _ in range(n_chunks * LONG_PIECE + 17))
    chunks = [word[i:i + LONG_PIECE] for i in range(0, len(word), LONG_PIECE)]
    expect = [t for c in chunks for t in ref_bpe.encode_ordinary(c)]
    text = "Hello" + word + " world"
    ids = tok.encode(text)
    assert ids == ref_bpe.encode_ordinary("Hello") + expect + ref_bpe.encode_ordinary(" world")
    assert tok.decode(ids) == text
    special = tok.encode("<|start|>" + word + "<|end|>", special=True)
    assert special == [tok.token_id("<|start|>"), *expect, tok.token_id("<|end|>")]
