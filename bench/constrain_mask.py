"""Cost of the constrained-decoding token mask on the 201k o200k vocabulary, per library, against
the time of one decoded token.

    python bench/constrain_mask.py [--model FILE.gguf] [-r 5] [--decode /tmp/synth20b.gguf -n 16 -t 2]

The vocabulary is the model file's own tokenizer (default: the demo model, written to a temporary
folder; it carries the real o200k_harmony vocabulary). A nested JSON schema (objects in objects,
an array of objects with minItems, enums, anyOf, bounded integers, strings) and one document valid
under it are fixed below; the document is tokenized as the model would write it, and each library
walks it token by token: the time to compute the mask of allowed tokens before each token is the
per-token cost (median, 99th percentile and mean over the walk, best of -r repetitions; on a busy
machine the tail is mostly the process losing its CPU, so the median is the stable figure);
compiling the schema for the vocabulary is timed once. Libraries: llguidance (what pyengine uses), xgrammar,
outlines-core; one that is not installed is skipped. "pyengine" is llguidance as pyengine runs it
(pyengine.constrain.Constraint.allowed(): the bitmask, unpacked to a boolean vector, control tokens
cleared) plus applying it to a float32 logit vector as Sampler does: the whole cost per token.

With --decode MODEL, the time of one decode step of that model (Runner.eval of one token after a
short prompt, best of -r) is printed too, and the mask as a share of it (the issue asks < 10 %)."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pyengine.model_file import open_model
from pyengine.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": "integer", "minimum": 1, "maximum": 999999},
        "customer": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 40},
            "address": {"type": "object", "properties": {
                "street": {"type": "string"}, "city": {"type": "string"},
                "country": {"enum": ["DE", "FR", "IT", "NO", "US"]}},
                "required": ["street", "city", "country"], "additionalProperties": False},
            "vip": {"type": "boolean"}},
            "required": ["name", "address", "vip"], "additionalProperties": False},
        "items": {"type": "array", "minItems": 1, "items": {"type": "object", "properties": {
            "sku": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
            "qty": {"type": "integer", "minimum": 1, "maximum": 99},
            "color": {"enum": ["red", "green", "blue"]}},
            "required": ["sku", "qty", "color"], "additionalProperties": False}},
        "payment": {"anyOf": [
            {"type": "object", "properties": {"card": {"type": "string", "maxLength": 19}},
             "required": ["card"], "additionalProperties": False},
            {"type": "object", "properties": {"iban": {"type": "string"}, "bic": {"type": "string"}},
             "required": ["iban", "bic"], "additionalProperties": False}]},
        "notes": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
    },
    "required": ["order_id", "customer", "items", "payment", "notes"],
    "additionalProperties": False,
}
DOCUMENT = {
    "order_id": 48213,
    "customer": {"name": "Ada Lovelace", "address": {"street": "12 St James's Square", "city": "London",
                                                     "country": "US"}, "vip": True},
    "items": [{"sku": "AB-123", "qty": 2, "color": "blue"}, {"sku": "ZX-900", "qty": 14, "color": "red"},
              {"sku": "QQ-007", "qty": 1, "color": "green"}],
    "payment": {"iban": "DE89 3704 0044 0532 0130 00", "bic": "COBADEFFXXX"},
    "notes": ["leave at the door", "fragile: glass inside", "call before delivery"],
}
TEXT = json.dumps(DOCUMENT, ensure_ascii=False)  # ", " and ": " separators, like pyengine.constrain


def walk(n_tokens: int, mask: Callable[[], object], consume: Callable[[int], None], ids: list[int]) -> list[float]:
    """Seconds of each mask computation along the document."""
    times = []
    for t in ids[:n_tokens]:
        t0 = time.perf_counter()
        mask()
        times.append(time.perf_counter() - t0)
        consume(t)
    return times


def bench_pyengine(tok: Tokenizer, ids: list[int], reps: int) -> tuple[float, list[float]]:
    from pyengine.constrain import Constraint, request_spec, vocab_for
    from pyengine.sampling import Sampler, SamplingParams

    vocab_for(tok)  # the token table is built once per tokenizer, not per request
    t0 = time.perf_counter()
    spec = request_spec(tok, json_schema=SCHEMA)
    compile_s = time.perf_counter() - t0
    logits = np.random.default_rng(0).standard_normal(tok.n_vocab).astype(np.float32)
    sampler = Sampler(SamplingParams(temperature=0.0))
    best = None
    for _ in range(reps):
        c = Constraint(spec, tok, tok.n_vocab, chat=False, eog=tok.eog_ids)
        times = []
        for t in ids:
            t0 = time.perf_counter()
            allowed = c.allowed()
            x = sampler.adjusted_logits(logits)
            x[~allowed] = -np.inf  # what Sampler.candidates does with the mask
            times.append(time.perf_counter() - t0)
            assert allowed[t], f"the document's token {t} was masked"
            c.advance(t)
        best = times if best is None or sum(times) < sum(best) else best
    # adjusted_logits runs unconstrained too: only the mask's share is the mask's cost
    base = []
    for _ in range(len(ids)):
        t0 = time.perf_counter()
        sampler.adjusted_logits(logits)
        base.append(time.perf_counter() - t0)
    shift = statistics.median(base)
    return compile_s, [max(0.0, t - shift) for t in best]


def bench_llguidance(tok: Tokenizer, ids: list[int], reps: int) -> tuple[float, list[float]]:
    import llguidance

    from pyengine.constrain import JSON_OPTIONS, vocab_for

    ll = vocab_for(tok).ll
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults=JSON_OPTIONS)
    matcher = llguidance.LLMatcher(ll, grammar)
    assert not matcher.is_error(), matcher.get_error()
    compile_s = time.perf_counter() - t0
    best = None
    for _ in range(reps):
        m = llguidance.LLMatcher(ll, grammar)

        def consume(t: int, m: llguidance.LLMatcher = m) -> None:
            assert m.consume_token(t), m.get_error()

        times = walk(len(ids), m.compute_bitmask, consume, ids)
        best = times if best is None or sum(times) < sum(best) else best
    return compile_s, best


def bench_xgrammar(tok: Tokenizer, ids: list[int], reps: int) -> tuple[float, list[float]]:
    import xgrammar as xgr

    special = set(tok.special_tokens.values())
    pieces = [b"" if i in special else tok.token_to_piece(i) for i in range(tok.n_vocab)]
    info = xgr.TokenizerInfo(pieces, xgr.VocabType.RAW, vocab_size=tok.n_vocab,
                             stop_token_ids=sorted(tok.eog_ids))
    t0 = time.perf_counter()
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False,
                                                             separators=(", ", ": "))
    compile_s = time.perf_counter() - t0
    bitmask = np.full((1, (tok.n_vocab + 31) // 32), -1, dtype=np.int32)
    best = None
    for _ in range(reps):
        m = xgr.GrammarMatcher(compiled)

        def consume(t: int, m: xgr.GrammarMatcher = m) -> None:
            assert m.accept_token(t), f"xgrammar refused token {t}"

        times = walk(len(ids), lambda m=m: m.fill_next_token_bitmask(bitmask), consume, ids)
        best = times if best is None or sum(times) < sum(best) else best
    return compile_s, best


def bench_outlines(tok: Tokenizer, ids: list[int], reps: int) -> tuple[float, list[float]]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    special = set(tok.special_tokens.values())
    eos = tok.eos_id if tok.eos_id is not None else min(tok.eog_ids)
    table: dict[bytes, list[int]] = {}
    for i in range(tok.n_vocab):
        if i not in special and i != eos:
            table.setdefault(tok.token_to_piece(i), []).append(i)
    t0 = time.perf_counter()
    regex = build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern=r" ?")
    index = Index(regex, Vocabulary(eos, table))
    compile_s = time.perf_counter() - t0
    bitmask = np.full((1, (tok.n_vocab + 31) // 32), -1, dtype=np.int32)
    best = None
    for _ in range(reps):
        g = Guide(index)
        times = walk(len(ids), lambda g=g: g.write_mask_into(bitmask.ctypes.data, bitmask.size, 4),
                     lambda t, g=g: g.advance(t), ids)
        best = times if best is None or sum(times) < sum(best) else best
    return compile_s, best


def decode_step(path: str, threads: int, n: int, reps: int) -> float:
    """Seconds of one decode step (best of `reps` runs of n steps) after a 16-token prompt."""
    from pyengine import Engine

    eng = Engine(path, n_ctx=64 + n, n_threads=threads)
    rng = np.random.default_rng(0)
    best = float("inf")
    for _ in range(reps):
        eng.reset()
        eng.eval(rng.integers(0, eng.n_vocab, 16).tolist())
        t0 = time.perf_counter()
        for t in rng.integers(0, eng.n_vocab, n):
            eng.eval([int(t)])
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a GGUF whose tokenizer to use (default: the demo model)")
    ap.add_argument("-r", type=int, default=5, help="repetitions of the walk (best is reported)")
    ap.add_argument("--libs", default="pyengine,llguidance,xgrammar,outlines-core")
    ap.add_argument("--decode", metavar="MODEL", help="also time one decode step of this model")
    ap.add_argument("-n", type=int, default=16, help="decode steps per repetition")
    ap.add_argument("-t", type=int, default=2, help="threads for --decode")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            from pyengine.demo_model import write_demo_model

            path = str(write_demo_model(Path(tmp) / "demo.gguf", n_layer=1))
        tok = Tokenizer.from_metadata(open_model(path).metadata)
    ids = tok.encode(TEXT)
    print(f"vocabulary: {tok.n_vocab} tokens; document: {len(ids)} tokens, {len(TEXT)} chars; best of {args.r}")
    runs = {"pyengine": bench_pyengine, "llguidance": bench_llguidance, "xgrammar": bench_xgrammar,
            "outlines-core": bench_outlines}
    print("| library | compile (ms) | mask median (us/token) | mask p99 (us/token) | mask mean (us/token) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    stats = {}
    for name in args.libs.split(","):
        try:
            compile_s, times = runs[name](tok, ids, args.r)
        except ImportError as e:
            print(f"| {name} | not installed ({e.name}) | | | |")
            continue
        us = np.array(times) * 1e6
        stats[name] = (float(np.median(us)), float(us.mean()))
        print(f"| {name} | {compile_s * 1e3:.1f} | {np.median(us):.1f} | {np.percentile(us, 99):.1f} "
              f"| {us.mean():.1f} |")
    if args.decode:
        step = decode_step(args.decode, args.t, args.n, args.r)
        print(f"\ndecode step of {args.decode} ({args.t} threads): {step * 1e3:.1f} ms/token")
        for name, (median, mean) in stats.items():
            print(f"{name}: mask = {100 * median * 1e-6 / step:.2f} % (median) / {100 * mean * 1e-6 / step:.2f} % "
                  "(mean) of a decode step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
