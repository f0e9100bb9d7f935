"""Slots, a bounded queue, and one worker thread that steps every active sequence together.

One slot per --parallel sequence, each a KV cache (pyengine.runner.Cache). New requests join
between steps (continuous admission), each taking the free slot where reuse saves the most: prompt
tokens already cached there minus the tokens of that slot's last prompt it would throw away (a
conversation's next turn finds its own earlier turns; a new one takes an empty slot rather than
evict another conversation for a shared system prompt), or the slot it names (llama-server's
id_slot: it waits for that one, and later requests may take free slots meanwhile); a cancelled
request (client gone) leaves before the next step, so its slot is free within one step. Each
iteration is one `Core.step(active sequences)`: one batched forward pass for all of them
(continuous batching), the same core the library runs one sequence at a time.

A request for n > 1 choices is a group of n jobs admitted together on n slots: the first (the
leader) evaluates the prompt; the others (followers) wait until it is in the leader's cache, copy
those K/V rows into their own slots (Runner.copy_cache; a cache that cannot be copied evaluates
the prompt itself) and from then on decode in the same batched steps as the leader.

With a prompt cache (pyengine.node.prompt_cache, --cache-ram), a slot's contents that a new
request would overwrite are saved to host memory first, and a request whose prompt continues a
saved conversation gets it written back into its slot before it starts.

Work on one slot's cache (saving it to a file, restoring it, erasing it: POST /slots/{id}) runs
on the worker thread between steps, once no request holds that slot.

Each step's events travel to the request's asyncio queue through `loop.call_soon_threadsafe`,
so the event loop never blocks on the model."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyengine.constrain import Spec
from pyengine.core import Event, Finished, PromptEvaluated, Request, Sampled
from pyengine.core import Failed as StepFailed
from pyengine.core import Sequence as CoreSequence
from pyengine.node.backend import Backend
from pyengine.node.metrics import Metrics
from pyengine.node.prompt_cache import PromptCache
from pyengine.runner import Cache
from pyengine.sampling import SamplingParams

if TYPE_CHECKING:
    from pyengine.engine_state import EngineState

log = logging.getLogger("pyengine")


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is at its bound."""


class ShuttingDown(Exception):
    """The scheduler no longer accepts work."""


@dataclass
class Done:
    """The job's sequence finished; timings in llama-server's shape."""

    finished: Finished
    timings: dict[str, Any]


@dataclass
class Failed:
    message: str
    status: int = 500
    type: str = "server_error"


@dataclass
class Job:
    """One generation request as the worker thread sees it."""

    prompt: list[int]
    params: SamplingParams
    chat: bool
    max_tokens: int
    stops: list[str]
    endpoint: str
    loop: asyncio.AbstractEventLoop
    logprobs: int | None = None
    prompt_logprobs: bool = False
    constraint: Spec | None = None
    request_id: str = ""
    slot: int | None = None  # the slot it must run in (llama-server's id_slot); None: the scheduler picks
    leader: Job | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    t_submit: float = field(default_factory=time.perf_counter)
    t_start: float = 0.0
    t_prompt_done: float = 0.0
    t_last_token: float = 0.0
    n_cached: int = 0
    n_prompt_eval: int = 0
    n_generated: int = 0
    seq: CoreSequence | None = None

    def cancel(self) -> None:
        """Ask the worker to drop this job before its next step (thread-safe)."""
        self.cancelled = True

    def post(self, event: list[Event] | Done | Failed) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            self.cancelled = True  # the event loop is gone


@dataclass(eq=False)  # tasks compare by identity
class SlotTask:
    """`run(cache)` on slot `index`, once no request holds it; the outcome lands in `future`."""

    index: int
    run: Callable[[Cache], Any]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class Scheduler:
    """Runs jobs on `n_parallel` slots of `backend`, at most `max_queue` waiting."""

    def __init__(self, backend: Backend, n_parallel: int = 1, max_queue: int = 64,
                 metrics: Metrics | None = None, verbose: bool = False,
                 prompt_cache: PromptCache | None = None) -> None:
        self.backend = backend
        self.n_ctx = backend.info.n_ctx
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self.verbose = verbose
        self.core = backend.core
        self.prompt_cache = prompt_cache
        self.slots: list[Cache] = [backend.new_cache() for _ in range(n_parallel)]
        self.free: list[Cache] = list(reversed(self.slots))
        self.queue: collections.deque[list[Job]] = collections.deque()
        self.active: list[tuple[Job, Cache]] = []
        self.following: list[tuple[Job, Cache]] = []
        self.last_prompt_len: dict[int, int] = {}
        self.last_job: dict[int, Job] = {}
        self.slot_tasks: list[SlotTask] = []
        self.cond = threading.Condition()
        self.stopping: str | None = None
        self.steps = itertools.count()
        self.thread = threading.Thread(target=self._run, name="pyengine-scheduler", daemon=True)
        self.thread.start()

    @property
    def n_parallel(self) -> int:
        return len(self.slots)

    def queue_depth(self) -> int:
        return sum(len(group) for group in list(self.queue))

    def n_active(self) -> int:
        return len(self.active)

    def kv_tokens(self) -> int:
        return sum(slot.n_past for slot in self.slots)

    def slot_states(self) -> list[dict[str, Any]]:
        """Per slot, as GET /slots shows it: id, n_ctx, is_processing, the tokens its KV cache holds
        (a next prompt with that prefix reuses them) and the tokens its latest request generated."""
        busy = {id(slot) for _, slot in [*self.active, *self.following]}
        out = []
        for i, slot in enumerate(self.slots):
            job = self.last_job.get(id(slot))
            out.append({"id": i, "n_ctx": slot.n_ctx, "is_processing": id(slot) in busy,
                        "n_prompt_tokens_cached": slot.n_past, "n_decoded": job.n_generated if job else 0})
        return out

    def submit(self, job: Job, followers: list[Job] | tuple[Job, ...] = ()) -> None:
        """Queue `job` (with `followers`: the other choices of an n > 1 request, whose `leader` is
        `job`); raises QueueFull or ShuttingDown instead of waiting."""
        group = [job, *followers]
        if len(group) > self.n_parallel:
            raise ValueError(f"{len(group)} choices need {len(group)} slots; there are {self.n_parallel}")
        with self.cond:
            if self.stopping:
                raise ShuttingDown(self.stopping)
            if len(self.queue) >= self.max_queue and not self.free:
                raise QueueFull(f"all {self.n_parallel} slots are busy and {len(self.queue)} "
                                "requests are waiting; retry later")
            self.queue.append(group)
            self.cond.notify()

    def save_slot(self, index: int) -> concurrent.futures.Future[EngineState]:
        """A copy of what slot `index` holds (Backend.save_slot), taken once no request holds it."""
        return self._on_slot(index, self.backend.save_slot)

    def restore_slot(self, index: int, state: EngineState) -> concurrent.futures.Future[int]:
        """Make slot `index` hold `state` once no request holds it (what it held goes to the prompt
        cache first, when there is one); the tokens it then holds. A next prompt that continues
        them picks this slot and reuses them."""
        def run(slot: Cache) -> int:
            if self.prompt_cache is not None:
                self.prompt_cache.save(slot)
            self.backend.restore_slot(slot, state)
            self.last_prompt_len[id(slot)] = len(state.tokens)
            self.last_job.pop(id(slot), None)
            return len(state.tokens)
        return self._on_slot(index, run)

    def erase_slot(self, index: int) -> concurrent.futures.Future[int]:
        """Empty slot `index` once no request holds it; the tokens it held."""
        def run(slot: Cache) -> int:
            n = slot.n_past
            slot.reset()
            self.last_prompt_len.pop(id(slot), None)
            self.last_job.pop(id(slot), None)
            return n
        return self._on_slot(index, run)

    def _on_slot(self, index: int, run: Callable[[Cache], Any]) -> concurrent.futures.Future:
        if not 0 <= index < self.n_parallel:
            raise IndexError(f"there is no slot {index} (slots 0..{self.n_parallel - 1})")
        task = SlotTask(index, run)
        with self.cond:
            if self.stopping:
                raise ShuttingDown(self.stopping)
            self.slot_tasks.append(task)
            self.cond.notify()
        return task.future

    def _run_slot_tasks(self) -> None:
        """Run the slot tasks whose slot is free (worker thread; requests take slots on it too)."""
        with self.cond:
            ready = [t for t in self.slot_tasks if any(s is self.slots[t.index] for s in self.free)]
            self.slot_tasks = [t for t in self.slot_tasks if t not in ready]
        for task in ready:
            try:
                task.future.set_result(task.run(self.slots[task.index]))
            except Exception as e:  # noqa: BLE001 - the caller gets it (a file it cannot restore, ...)
                task.future.set_exception(e)

    def withdraw(self, job: Job) -> None:
        """Cancel `job`; if it is still waiting, drop it from the queue at once."""
        job.cancel()
        with self.cond:
            for group in self.queue:
                if job in group:
                    group.remove(job)
                    if not group:
                        self.queue.remove(group)
                    break

    def shutdown(self, reason: str = "the server is shutting down", timeout: float = 10.0) -> None:
        """Stop after the current step; every waiting or running job ends with a 503 error."""
        with self.cond:
            if self.stopping is None:
                self.stopping = reason
            self.cond.notify()
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.queue and not self.active and not self.following \
                        and not self.slot_tasks:
                    self.cond.wait()
                if self.stopping:
                    break
            self._run_slot_tasks()
            with self.cond:
                admitted = self._take_slots()
            for job, slot in admitted:
                if job.leader is None:
                    self._admit(job, slot)
                else:
                    self.following.append((job, slot))
            for job, slot in [a for a in self.active if a[0].cancelled]:
                self._release(job, slot, "cancelled")
            self._start_followers()
            if not self.active:
                continue
            active = list(self.active)
            t_step = time.perf_counter()
            try:
                outputs = self.core.step([job.seq for job, _ in active])
            except Exception as e:  # noqa: BLE001 - a step failed as a whole: its requests end, not the node
                log.exception("generation step failed")
                for job, slot in active:
                    slot.reset()
                    job.post(Failed(f"generation failed: {e}"))
                    self._release(job, slot, "error")
                continue
            self.metrics.observe_step(time.perf_counter() - t_step,
                                      sum(ev.n for evs in outputs for ev in evs if isinstance(ev, PromptEvaluated)),
                                      sum(isinstance(ev, Sampled) for evs in outputs for ev in evs))
            for (job, slot), events in zip(active, outputs):
                self._advance(job, slot, events)
        for job, slot in list(self.active):
            job.post(Failed(self.stopping, 503, "unavailable_error"))
            self._release(job, slot, "cancelled")
        with self.cond:
            waiting, self.queue = [job for group in self.queue for job in group], collections.deque()
        waiting += [job for job, _ in self.following]
        for job in waiting:
            job.post(Failed(self.stopping, 503, "unavailable_error"))
        with self.cond:
            tasks, self.slot_tasks = self.slot_tasks, []
        for task in tasks:
            task.future.set_exception(ShuttingDown(self.stopping))

    def _take_slots(self) -> list[tuple[Job, Cache]]:
        """The waiting jobs that get a slot now, in order (under the lock): each group takes the
        free slots that reuse the most; a job pinned to a slot (Job.slot) waits for that one, and
        the jobs behind it may go first; the first unpinned group that does not fit stops the rest."""
        admitted = []
        for group in list(self.queue):
            pinned = group[0].slot
            if pinned is not None:
                wanted = self.slots[pinned]
                if any(s is wanted for s in self.free):
                    self.queue.remove(group)
                    self.free.remove(wanted)
                    admitted.append((group[0], wanted))
                continue
            if len(self.free) < len(group):
                break
            self.queue.remove(group)
            for job in group:
                slot = max(self.free, key=lambda s: self._reuse_value(s, job.prompt))
                self.free.remove(slot)
                admitted.append((job, slot))
        return admitted

    def _start_followers(self) -> None:
        """Start each follower whose leader's prompt is now in the leader's cache, from a copy of
        that cache; one whose leader ended first (or cannot lend its cache) evaluates the prompt."""
        for job, slot in list(self.following):
            lead = job.leader
            if job.cancelled:
                self.following.remove((job, slot))
                self._free(slot)
                self.metrics.count_request(job.endpoint, "cancelled")
                continue
            seq = lead.seq
            lead_gone = seq is None or seq.done or lead.cancelled
            if not lead_gone and not seq.prompt_evaluated:
                continue  # the leader's prompt is still being evaluated
            if not lead_gone and seq.cache.tokens == job.prompt:
                self._keep(slot, job)
                self.core.runner.copy_cache(seq.cache, slot)
            self.following.remove((job, slot))
            self._admit(job, slot)

    def _reuse_value(self, slot: Cache, prompt: list[int]) -> tuple[int, int]:
        """Prompt tokens `slot` would reuse minus the tokens of its last prompt that would be lost
        (its generated tokens count for nothing: a next turn re-renders them anyway); then the reuse.
        Reuse is what the slot can rewind to (Runner.prompt_reuse), not merely what it shares."""
        shared = self.core.runner.prompt_reuse(slot, prompt)
        return shared - max(0, self.last_prompt_len.get(id(slot), 0) - shared), shared

    def _keep(self, slot: Cache, job: Job) -> None:
        """Save `slot`'s contents in the prompt cache when `job` would throw away part of the
        prompt that the slot's last request left there (not merely the tokens that request
        generated: a conversation's next turn re-renders them anyway)."""
        if self.prompt_cache is not None:
            shared = 0 if job.prompt_logprobs else slot.common_prefix(job.prompt)
            if shared < self.last_prompt_len.get(id(slot), 0):
                self.prompt_cache.save(slot)

    def _admit(self, job: Job, slot: Cache) -> None:
        job.t_start = time.perf_counter()
        if self.prompt_cache is not None and (job.prompt_logprobs or not self.prompt_cache.restore_best(slot, job.prompt)):
            self._keep(slot, job)
        try:
            job.seq = self.core.start(slot, Request(job.prompt, job.params, job.max_tokens, job.stops, job.logprobs,
                                                    job.chat, prompt_logprobs=job.prompt_logprobs,
                                                    constraint=job.constraint))
            job.n_cached = job.seq.n_cached
        except Exception as e:
            log.exception("could not start a request")
            job.post(Failed(f"could not start generation: {e}"))
            self._free(slot)
            self.metrics.count_request(job.endpoint, "error")
            return
        self.last_prompt_len[id(slot)] = len(job.prompt)
        self.last_job[id(slot)] = job
        self.active.append((job, slot))

    def _free(self, slot: Cache) -> None:
        with self.cond:
            self.free.append(slot)

    def _release(self, job: Job, slot: Cache, outcome: str) -> None:
        self.active.remove((job, slot))
        self._free(slot)
        self.metrics.count_request(job.endpoint, outcome)

    def _advance(self, job: Job, slot: Cache, events: list[Event]) -> None:
        now = time.perf_counter()
        finished = None
        for ev in events:
            if isinstance(ev, PromptEvaluated):
                job.n_prompt_eval += ev.n
            elif isinstance(ev, Sampled):
                if job.n_generated == 0:
                    job.t_prompt_done = job.t_prompt_done or now
                    self.metrics.observe_ttft(now - job.t_submit)
                else:
                    self.metrics.observe_token_gap(now - job.t_last_token)
                job.t_last_token = now
                job.n_generated += 1
            elif isinstance(ev, StepFailed):
                job.post(Failed(ev.message))
                self._release(job, slot, "error")
                return
            elif isinstance(ev, Finished):
                finished = ev
        if events:
            job.post(events)
        if finished is not None:
            self._finish(job, slot, finished, now)

    def _finish(self, job: Job, slot: Cache, fin: Finished, now: float) -> None:
        n_prompt = len(job.prompt)
        job.t_prompt_done = job.t_prompt_done or now
        prompt_ms = (job.t_prompt_done - job.t_start) * 1e3
        predicted_ms = (now - job.t_prompt_done) * 1e3
        timings = {
            "cache_n": job.n_cached, "prompt_n": job.n_prompt_eval, "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / max(job.n_prompt_eval, 1),
            "prompt_per_second": job.n_prompt_eval / prompt_ms * 1e3 if prompt_ms > 0 else 0.0,
            "predicted_n": job.n_generated, "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / max(job.n_generated, 1),
            "predicted_per_second": job.n_generated / predicted_ms * 1e3 if predicted_ms > 0 else 0.0,
        }
        job.post(Done(fin, timings))
        self.metrics.count_tokens(prompt=n_prompt, cached=job.n_cached, generated=job.n_generated)
        self._release(job, slot, "ok")
        if self.verbose:
            log.info("request %s: prompt eval time = %.2f ms / %d tokens (%.2f ms per token, "
                     "%.2f tokens per second)", job.request_id, prompt_ms, job.n_prompt_eval,
                     timings["prompt_per_token_ms"], timings["prompt_per_second"])
            log.info("request %s:        eval time = %.2f ms / %d tokens (%.2f ms per token, "
                     "%.2f tokens per second)", job.request_id, predicted_ms, job.n_generated,
                     timings["predicted_per_token_ms"], timings["predicted_per_second"])
            log.info("request %s:       total time = %.2f ms / %d tokens", job.request_id,
                     (now - job.t_submit) * 1e3, job.n_prompt_eval + job.n_generated)
