"""Stream a reply to one prompt: `pyengine run MODEL "prompt"` (the prompt from stdin if omitted).

The prompt is a user message rendered in harmony (gpt-oss's chat format); the reasoning is shown
dimmed and the answer plainly. --raw treats the prompt as plain text and streams its continuation."""

from __future__ import annotations

import argparse
import sys

from pyengine.commands import _terminal


def add_arguments(p: argparse.ArgumentParser) -> None:
    _terminal.add_arguments(p)
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (default: read stdin)")
    p.add_argument("--raw", action="store_true", help="plain text completion, no chat format")
    p.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")


def run(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        print("[ERROR] the prompt is empty", file=sys.stderr)
        return 2
    eng = _terminal.open_engine(args)
    if args.raw:
        if len(eng.tokenize(prompt, special=True)) >= eng.n_ctx:
            print(f"[ERROR] the prompt does not fit the context of {eng.n_ctx} tokens (use --n-ctx)",
                  file=sys.stderr)
            return 1
        sys.stdout.write(prompt)
        stream = eng.create_completion(prompt, stream=True, seed=args.seed, **_terminal.sampling(args))
        code = 0
        try:
            for chunk in stream:
                sys.stdout.write(chunk["choices"][0]["text"])
                sys.stdout.flush()
        except KeyboardInterrupt:
            code = 130  # as in chat mode: the text so far stays printed
        sys.stdout.write("\n")
        return code
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": prompt}]
    ids = eng.apply_chat_template(messages, reasoning_effort=args.reasoning_effort)
    if len(ids) >= eng.n_ctx:
        print(f"[ERROR] the prompt has {len(ids)} tokens; the context holds {eng.n_ctx} (use --n-ctx)",
              file=sys.stderr)
        return 1
    reply = _terminal.stream_chat_reply(eng, ids, args)
    if args.stats:
        print(f"[INFO] {reply.stats()}", file=sys.stderr)
    return 130 if reply.finish_reason == "cancelled" else 0
