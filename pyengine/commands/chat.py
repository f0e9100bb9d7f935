"""Interactive chat: `pyengine chat MODEL` (reasoning dimmed, the answer plain).

Each turn renders the whole conversation in harmony; the prompt-prefix cache means only the new
turn is evaluated. Commands: /regen answers the last message again (its prompt comes from the KV
cache, through the checkpoint of the sliding rings taken at its end), /reset starts over, /exit (or
Ctrl-D) quits; Ctrl-C stops a reply."""

from __future__ import annotations

import argparse
import sys

from pyengine.commands import _terminal


def add_arguments(p: argparse.ArgumentParser) -> None:
    _terminal.add_arguments(p)
    p.add_argument("--stats", action="store_true", help="print token counts and speed after each reply")


def _read(prompt: str) -> str | None:
    try:
        return input(prompt)
    except EOFError:
        return None


def run(args: argparse.Namespace) -> int:
    eng = _terminal.open_engine(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"pyengine chat: {eng.model_file.name} (n_ctx {eng.n_ctx}). /regen, /reset, /exit; "
              "Ctrl-C stops a reply.")
    while True:
        try:
            line = _read("> " if interactive else "")
        except KeyboardInterrupt:
            print()
            return 0
        if line is None or line.strip() == "/exit":
            return 0
        if not line.strip():
            continue
        if line.strip() == "/reset":
            messages = list(system)
            continue
        if line.strip() == "/regen":
            if not messages or messages[-1]["role"] != "assistant":
                print("[ERROR] /regen: no answer to replace yet", file=sys.stderr)
                continue
            messages.pop()  # the same conversation up to the last message: asked again
        else:
            messages.append({"role": "user", "content": line})
        ids = eng.apply_chat_template(messages, reasoning_effort=args.reasoning_effort)
        if len(ids) >= eng.n_ctx:
            print(f"[ERROR] the conversation ({len(ids)} tokens) no longer fits n_ctx={eng.n_ctx}; /reset",
                  file=sys.stderr)
            messages.pop()
            continue
        reply = _terminal.stream_chat_reply(eng, ids, args)
        if args.stats:
            print(f"[INFO] {reply.stats()} (reused {eng.n_prompt_reused} cached tokens)",
                  file=sys.stderr)
        answer: dict = {"role": "assistant", "content": reply.content}
        if reply.reasoning:
            answer["reasoning_content"] = reply.reasoning
        if reply.tool_calls:
            answer["tool_calls"] = reply.tool_calls
        messages.append(answer)
