"""A conversation's next turn, a regenerated turn and a branch from an earlier turn after long
generations: with several sliding-ring checkpoints (the default 8), one, and none.

    python bench/next_turn.py MODEL.gguf [--prompt 1000] [--generate 600] [--answer 600] [-t 2] [-b 512]

Turn 1 is a chat prompt of about --prompt tokens and --generate greedy tokens (no stop, so the
generation runs past what the sliding layers' rings can rewind: n_batch + 1 tokens). Turn 2 is the
same chat with a final answer of about --answer tokens and a new user message, rendered as Harmony
renders a next turn: without turn 1's reasoning, so it leaves the cache right after turn 1's
prompt; it too generates --generate tokens. Then turn 2's prompt again (a regenerated answer), and
a branch: turn 1 followed by another, short answer and another question (a client that goes back
to an earlier turn), which leaves the cache more than the rings reach before turn 2's checkpoint.
For each, prints the prompt tokens taken from the cache and the time to the first token, with
Engine(ctx_checkpoints=8, 1, 0) set on one engine in one process; and what a checkpoint costs."""

import argparse
import time

import pyengine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a gpt-oss .gguf file")
    ap.add_argument("--prompt", type=int, default=1000, help="turn 1's prompt, about this many tokens")
    ap.add_argument("--generate", type=int, default=600, help="tokens turns 1 and 2 generate")
    ap.add_argument("--answer", type=int, default=600, help="turn 1's final answer in turn 2's prompt, about this many tokens")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-b", "--batch-size", type=int, default=512)
    args = ap.parse_args()
    eng = pyengine.Engine(args.model, n_ctx=4096, n_threads=args.threads, n_batch=args.batch_size)

    def repeat(sentence: str, tokens: int) -> str:
        return sentence * max(1, tokens // len(eng.tokenize(sentence)))

    turn1 = [{"role": "user", "content": repeat("The cathedral of Köln took six centuries to finish, and its "
                                                "two towers still lead the skyline. ", args.prompt)}]
    turn2 = turn1 + [{"role": "assistant", "content": repeat("It took 632 years, from 1248 to 1880. ", args.answer)},
                     {"role": "user", "content": "And who finished it?"}]
    branch = turn1 + [{"role": "assistant", "content": "It took 632 years."},
                      {"role": "user", "content": "Who began it?"}]
    prompt1, prompt2, prompt3 = (eng.apply_chat_template(c) for c in (turn1, turn2, branch))
    print(f"turn 1: {len(prompt1)} prompt tokens, {args.generate} generated; turn 2: {len(prompt2)} prompt tokens, "
          f"{args.generate} generated; branch: {len(prompt3)} prompt tokens; n_batch {eng.n_batch}, "
          f"{args.threads} threads")

    def first_token(prompt: list[int], label: str, generate: int = 1) -> None:
        t0 = time.perf_counter()
        it = iter(eng.generate(prompt, max_tokens=generate, temperature=0, stop_token_ids=()))
        next(it)
        t1 = time.perf_counter()
        for _ in it:
            pass
        print(f"  {label:>10}: reused {eng.n_prompt_reused:5d} prompt tokens, evaluated "
              f"{len(prompt) - eng.n_prompt_reused:5d}, first token after {t1 - t0:6.2f} s")

    for kept in (8, 1, 0):
        eng.runner.n_checkpoints = kept
        eng.reset()
        print(f"ctx_checkpoints={kept}")
        first_token(prompt1, "turn 1", args.generate)
        first_token(prompt2, "next turn", args.generate)
        first_token(prompt2, "regenerate")
        first_token(prompt3, "branch")
    eng.runner.n_checkpoints = 8
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        eng.runner.take_checkpoint(eng._cache)
        times.append(time.perf_counter() - t0)
    print(f"take_checkpoint: {eng._cache.checkpoints[-1].nbytes / 1e6:.1f} MB, "
          f"{min(times) * 1e3:.1f}-{max(times) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
