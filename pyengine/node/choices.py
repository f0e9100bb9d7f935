"""The n choices of one request (OpenAI's `n`), merged into one answer.

Each choice is its own scheduler Job with its own output object (pyengine.openai_output, built
with its `index`, all sharing one `id` and `created`); the scheduler decodes them together
(see scheduler.py). This module turns their separate events into what a client expects: one
non-streamed object listing every choice, or one SSE stream whose chunks carry each choice's
index, with the usage (prompt counted once, completions summed) at the end. With n = 1 both
are exactly the single-choice answer."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from pyengine.core import Event, Finished
from pyengine.node.scheduler import Done, Failed, Job
from pyengine.openai_output import ChatOutput, TextOutput
from pyengine.sampling import SamplingParams

Output = ChatOutput | TextOutput


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice `index`'s sampling: with a seed, seed + index, so the choices differ but each is
    what a single request with that seed gives."""
    if index == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=params.seed + index)


def share_identity(outs: list[Output]) -> None:
    """Every choice's objects carry the first one's id and created time."""
    for out in outs[1:]:
        out.id, out.created = outs[0].id, outs[0].created


def total(fins: list[Finished]) -> Finished:
    """One request's usage over its choices: the prompt once, every choice's completion tokens."""
    first = fins[0]
    return Finished(first.reason, first.prompt_tokens, first.cached_tokens,
                    sum(f.completion_tokens for f in fins), sum(f.reasoning_tokens for f in fins))


def merge_results(outs: list[Output], dones: list[Done]) -> dict[str, Any]:
    """The non-streamed object of all choices (timings: the first choice's)."""
    results = [out.result(d.finished, timings=d.timings) for out, d in zip(outs, dones)]
    merged = results[0]
    merged["choices"] = [c for r in results for c in r["choices"]]
    merged["usage"] = total([d.finished for d in dones]).usage()
    return merged


async def merged_events(jobs: list[Job]) -> AsyncIterator[tuple[int, list[Event] | Done | Failed]]:
    """(choice index, event) of every job, in arrival order, until each job is Done or one Failed."""
    queue: asyncio.Queue = asyncio.Queue()

    async def forward(i: int, job: Job) -> None:
        while True:
            ev = await job.events.get()
            queue.put_nowait((i, ev))
            if isinstance(ev, (Done, Failed)):
                return

    tasks = [asyncio.create_task(forward(i, job)) for i, job in enumerate(jobs)]
    try:
        remaining = len(jobs)
        while remaining:
            i, ev = await queue.get()
            yield i, ev
            if isinstance(ev, Failed):
                return
            remaining -= isinstance(ev, Done)
    finally:
        for t in tasks:
            t.cancel()
