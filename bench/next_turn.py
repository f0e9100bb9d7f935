"""A conversation's next turn after a long generation: with and without the sliding-ring checkpoint.

    python bench/next_turn.py MODEL.gguf [--prompt 1000] [--generate 600] [-t 2]

Turn 1 is a chat prompt of about --prompt tokens and --generate greedy tokens (no stop, so the
generation runs past what the sliding layers' rings can rewind: n_batch + 1 tokens). Turn 2 is the
same chat with a short final answer and a new user message, rendered as Harmony renders a next
turn: without turn 1's reasoning, so it leaves the cache right after turn 1's prompt. Prints turn 2's
prompt tokens taken from the cache and its time to the first token, once with the checkpoint the
engine takes at each prompt's end (the default) and once with checkpoints turned off, in one
process on one engine; and what taking a checkpoint costs."""

import argparse
import time

import pyengine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a gpt-oss .gguf file")
    ap.add_argument("--prompt", type=int, default=1000, help="turn 1's prompt, about this many tokens")
    ap.add_argument("--generate", type=int, default=600, help="tokens turn 1 generates")
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args()
    eng = pyengine.Engine(args.model, n_ctx=4096, n_threads=args.threads)
    sentence = "The cathedral of Köln took six centuries to finish, and its two towers still lead the skyline. "
    text = sentence * max(1, args.prompt // len(eng.tokenize(sentence)))
    turn1 = [{"role": "user", "content": text}]
    turn2 = turn1 + [{"role": "assistant", "content": "It took 632 years."},
                     {"role": "user", "content": "And who finished it?"}]
    prompt1, prompt2 = eng.apply_chat_template(turn1), eng.apply_chat_template(turn2)
    print(f"turn 1: {len(prompt1)} prompt tokens, {args.generate} generated; turn 2: {len(prompt2)} prompt tokens; "
          f"n_batch {eng.n_batch}, {args.threads} threads")
    for mode in ("checkpoint", "no checkpoint"):
        if mode == "no checkpoint":
            eng.runner.take_checkpoint = lambda cache: None  # this engine only
        eng.reset()
        t0 = time.perf_counter()
        n = sum(1 for _ in eng.generate(prompt1, max_tokens=args.generate, temperature=0, stop_token_ids=()))
        t1 = time.perf_counter()
        next(iter(eng.generate(prompt2, max_tokens=1, temperature=0)))
        t2 = time.perf_counter()
        print(f"{mode:>14}: turn 1 {t1 - t0:6.1f} s ({n} tokens); turn 2 reused {eng.n_prompt_reused} prompt tokens, "
              f"evaluated {len(prompt2) - eng.n_prompt_reused}, first token after {t2 - t1:6.2f} s")
    del eng.runner.take_checkpoint
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        eng.runner.take_checkpoint(eng._cache)
        times.append(time.perf_counter() - t0)
    print(f"take_checkpoint: {eng._cache.checkpoint.nbytes / 1e6:.1f} MB, "
          f"{min(times) * 1e3:.1f}-{max(times) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
