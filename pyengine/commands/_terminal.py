"""What `pyengine run` and `pyengine chat` share: model/sampling options, opening the engine, and
streaming one reply to the terminal (reasoning dimmed, the answer plain, tool calls marked)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from pyengine.commands._args import integer, real
from pyengine.commands._device import cache_arguments, cache_options, gpu_arguments, gpu_options
from pyengine.core import Finished, Request, Sampled, Text, ToolCall
from pyengine.engine import Engine
from pyengine.sampling import OPENAI_DEFAULTS, SamplingParams

DIM, RESET = "\x1b[2m", "\x1b[0m"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a .gguf file, or a model name in the models folder")
    p.add_argument("--models-dir", help="models folder for names (default $LLM_NODE_MODELS_DIR, "
                                        "else ~/.llm-router/models)")
    p.add_argument("--n-ctx", "-c", type=integer(0), default=4096,
                   help="context length in tokens (default 4096; 0: the model's trained context)")
    p.add_argument("--threads", "-t", type=integer(1), default=None,
                   help="CPU threads (default: the physical cores this process may use)")
    p.add_argument("--max-tokens", "-n", type=integer(1), default=None,
                   help="most tokens per reply, at least 1 (default: until the model ends its turn or "
                        "the context is full)")
    p.add_argument("--temperature", type=real(0), default=OPENAI_DEFAULTS["temperature"],
                   help="0 = greedy (default 1.0, OpenAI's recommendation for gpt-oss)")
    p.add_argument("--top-p", type=real(0, 1), default=OPENAI_DEFAULTS["top_p"],
                   help="nucleus sampling: keep the most likely tokens up to this total probability "
                        "(0..1, default 1.0 = off)")
    p.add_argument("--top-k", type=integer(0), default=OPENAI_DEFAULTS["top_k"],
                   help="keep the K most likely tokens (default 0 = off)")
    p.add_argument("--min-p", type=real(0, 1), default=OPENAI_DEFAULTS["min_p"],
                   help="drop tokens less likely than P times the most likely one (0..1, default 0 = off)")
    p.add_argument("--seed", type=integer(0), default=None, help="sampling seed (reproducible replies)")
    p.add_argument("--reasoning-effort", choices=("low", "medium", "high"), default="medium",
                   help="how long the model reasons before answering (default medium)")
    p.add_argument("--system", default=None, help="instructions (the developer message)")
    p.add_argument("--hide-reasoning", action="store_true", help="do not print the reasoning")
    p.add_argument("--verbose", "-v", action="store_true", help="debug log lines")
    p.add_argument("--exact", action="store_true",
                   help="float32 activations in every product (default: int8 activations for quantized "
                        "weights, as llama.cpp; see docs/forward.md)")
    gpu_arguments(p)
    cache_arguments(p)


def open_engine(args: argparse.Namespace) -> Engine:
    return Engine(args.model, n_ctx=args.n_ctx, n_threads=args.threads, seed=args.seed,
                  verbose=args.verbose, models_dir=args.models_dir, exact=args.exact,
                  **gpu_options(args), **cache_options(args))


def sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
            "min_p": args.min_p, "max_tokens": args.max_tokens}


def use_color(out: TextIO) -> bool:
    return out.isatty() and "NO_COLOR" not in os.environ


@dataclass
class Reply:
    """One streamed reply: the answer, the reasoning, tool calls, and how long each part took."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str = "stop"
    n_prompt: int = 0
    n_generated: int = 0
    prompt_s: float = 0.0
    generate_s: float = 0.0

    def stats(self) -> str:
        rate = (self.n_generated - 1) / self.generate_s if self.generate_s > 0 and self.n_generated > 1 else 0.0
        return (f"{self.n_prompt} prompt tokens in {self.prompt_s:.2f} s, {self.n_generated} generated "
                f"({rate:.1f} tok/s), finish: {self.finish_reason}")


def stream_chat_reply(eng: Engine, prompt: list[int], args: argparse.Namespace, out: TextIO = sys.stdout) -> Reply:
    """Generate after a harmony prompt, printing deltas as they arrive; Ctrl-C ends the reply."""
    color = use_color(out)
    reply = Reply(n_prompt=len(prompt))
    mode = None  # what the terminal is printing: "reasoning" | "content" | "tool" | None
    start = time.perf_counter()
    first = None
    opts = sampling(args)
    params = SamplingParams(temperature=opts["temperature"], top_p=opts["top_p"], top_k=opts["top_k"],
                            min_p=opts["min_p"], seed=args.seed)
    try:
        for events in eng.run(Request(prompt, params, opts["max_tokens"], chat=True)):
            for ev in events:
                if isinstance(ev, Sampled):
                    reply.n_generated += 1
                    first = first or time.perf_counter()
                elif isinstance(ev, (Text, ToolCall)):
                    mode = _print_event(ev, mode, reply, args.hide_reasoning, color, out)
                elif isinstance(ev, Finished):
                    reply.finish_reason = ev.reason
    except KeyboardInterrupt:
        reply.finish_reason = "cancelled"
    end = time.perf_counter()
    if color and mode == "reasoning":
        out.write(RESET)
    out.write("\n")
    out.flush()
    reply.prompt_s = (first or end) - start
    reply.generate_s = end - (first or end)
    return reply


def _print_event(ev: Text | ToolCall, mode: str | None, reply: Reply, hide_reasoning: bool, color: bool,
                 out: TextIO) -> str | None:
    if isinstance(ev, Text) and ev.kind == "reasoning":
        reply.reasoning += ev.text
        if hide_reasoning:
            return mode
        if mode != "reasoning":
            out.write(DIM if color else "[reasoning] ")
        out.write(ev.text)
        mode = "reasoning"
    elif isinstance(ev, Text):
        if not ev.text:
            return mode
        reply.content += ev.text
        if mode == "reasoning":
            out.write(RESET + "\n\n" if color else "\n\n")
        out.write(ev.text)
        mode = "content"
    else:
        if ev.id:
            reply.tool_calls.append({"id": ev.id, "type": "function",
                                     "function": {"name": ev.name, "arguments": ""}})
            out.write((RESET if color and mode == "reasoning" else "") + f"\n[tool call] {ev.name} ")
        reply.tool_calls[ev.index]["function"]["arguments"] += ev.arguments
        out.write(ev.arguments)
        mode = "tool"
    out.flush()
    return mode
