"""A long prompt changed in its middle: how much of it comes back from the cache with checkpoints
inside prompts (Engine(checkpoint_min_step=N), default 4096) and with checkpoints only at prompt
ends (0).

    python bench/prompt_edit.py MODEL.gguf [--prompt 6000] [--edit-at 5000] [--step 4096] [-t 2] [-b 512]

A chat prompt of about --prompt tokens (a long document in one user message) is evaluated, then
the same prompt with one sentence replaced about --edit-at tokens in (an agent that trims an old
tool result, a document with one paragraph edited): further back from the prompt's end than the
sliding layers' rings reach (n_batch + 1 tokens), so with checkpoints only at prompt ends the
whole prompt is evaluated again. Prints, per setting, the prompt tokens taken from the cache, the
tokens evaluated and the time to the first token of the edited prompt, on one engine in one
process."""

import argparse
import time

import pyengine
from pyengine.runner import common_prefix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a gpt-oss .gguf file")
    ap.add_argument("--prompt", type=int, default=6000, help="the prompt, about this many tokens")
    ap.add_argument("--edit-at", type=int, default=5000, help="the changed sentence, about this many tokens in")
    ap.add_argument("--step", type=int, default=4096, help="checkpoint_min_step compared with 0")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-b", "--batch-size", type=int, default=512)
    args = ap.parse_args()
    eng = pyengine.Engine(args.model, n_ctx=args.prompt + 1024, n_threads=args.threads, n_batch=args.batch_size)
    sentence = "The cathedral of Köln took six centuries to finish, and its two towers still lead the skyline. "
    n = max(2, args.prompt // len(eng.tokenize(sentence)))
    at = min(n - 1, args.edit_at * n // args.prompt)
    doc = [sentence] * n
    edited = doc[:at] + ["Its nave was only vaulted in the nineteenth century, after a long pause. "] + doc[at + 1:]
    prompt, changed = (eng.apply_chat_template([{"role": "user", "content": "".join(d)}]) for d in (doc, edited))
    shared = common_prefix(prompt, changed)
    print(f"prompt {len(prompt)} tokens, the edited one {len(changed)}, shared prefix {shared}; "
          f"n_batch {eng.n_batch}, {args.threads} threads")
    for step in (args.step, 0):
        eng.runner.checkpoint_min_step = step
        eng.reset()
        t0 = time.perf_counter()
        list(eng.generate(prompt, max_tokens=1, temperature=0, stop_token_ids=()))
        t1 = time.perf_counter()
        counts = [c.n for c in eng._cache.checkpoints]
        list(eng.generate(changed, max_tokens=1, temperature=0, stop_token_ids=()))
        t2 = time.perf_counter()
        print(f"checkpoint_min_step={step}: prompt {t1 - t0:6.1f} s (checkpoints at {counts}); edited prompt: reused "
              f"{eng.n_prompt_reused} tokens, evaluated {len(changed) - eng.n_prompt_reused}, first token after "
              f"{t2 - t1:6.1f} s")


if __name__ == "__main__":
    main()
