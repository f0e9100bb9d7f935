"""Prometheus text exposition of the node's counters, gauges and latency histograms.

Small enough to write here without a client library: counters and histograms are updated from the
scheduler's worker thread and read by GET /metrics, so one lock guards them."""

from __future__ import annotations

import bisect
import collections
import threading
import time
from collections import defaultdict
from collections.abc import Callable

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _number(value: float) -> str:
    """A sample value in full precision (`:g` would print 1234567 as 1.23457e+06)."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


class Histogram:
    """Cumulative-bucket histogram as Prometheus defines it (le buckets, _sum, _count)."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for le, n in zip(self.buckets, self.counts):
            running += n
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {self.sum:.6f}")
        out.append(f"{name}_count {self.count}")
        return out


class StepWindow:
    """The forward steps of the last `span` seconds, for the web page's tokens/s.

    A step that evaluated prompt tokens counts as prefill time (its tokens over its duration), a
    step that only sampled as decode time; both rates are over the worker's busy time, so an idle
    minute does not dilute them (None when no such step happened in the window)."""

    def __init__(self, span: float = 60.0) -> None:
        self.span = span
        self.steps: collections.deque[tuple[float, float, int, int]] = collections.deque()

    def add(self, now: float, seconds: float, prompt_tokens: int, generated: int) -> None:
        self.steps.append((now, seconds, prompt_tokens, generated))
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self.steps and self.steps[0][0] < now - self.span:
            self.steps.popleft()

    def rates(self, now: float) -> dict[str, float | int | None]:
        self._trim(now)
        prefill_s = decode_s = 0.0
        prompt = generated = decoded = 0
        for _, seconds, p, g in self.steps:
            prompt += p
            generated += g
            if p:
                prefill_s += seconds
            elif g:
                decode_s += seconds
                decoded += g
        return {"window_seconds": self.span, "prompt_tokens": prompt, "generated_tokens": generated,
                "prefill_tokens_per_second": prompt / prefill_s if prefill_s > 0 else None,
                "decode_tokens_per_second": decoded / decode_s if decode_s > 0 else None}


class Metrics:
    """The node's metrics; gauges are read live through callables set by the app."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = defaultdict(int)
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.generated_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self.expert_counts: Callable[[], list[list[int]]] = list
        self.recent_steps = StepWindow()

    def count_request(self, endpoint: str, outcome: str) -> None:
        with self.lock:
            self.requests[(endpoint, outcome)] += 1

    def count_tokens(self, prompt: int = 0, cached: int = 0, generated: int = 0) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.cached_tokens += cached
            self.generated_tokens += generated

    def observe_ttft(self, seconds: float) -> None:
        with self.lock:
            self.ttft.observe(seconds)

    def observe_token_gap(self, seconds: float) -> None:
        with self.lock:
            self.tpot.observe(seconds)

    def observe_step(self, seconds: float, prompt_tokens: int, generated: int) -> None:
        """One forward step of the worker: how long it took and the tokens it evaluated / sampled."""
        with self.lock:
            self.recent_steps.add(time.monotonic(), seconds, prompt_tokens, generated)

    def recent_rates(self) -> dict[str, float | int | None]:
        """Prefill and decode tokens/s over the last minute (see StepWindow)."""
        with self.lock:
            return self.recent_steps.rates(time.monotonic())

    def gauge(self, name: str, help_: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (help_, read)

    def render(self) -> str:
        """The whole exposition, `text/plain; version=0.0.4`."""
        p = "pyengine_"
        with self.lock:
            out = [f"# HELP {p}requests_total Finished HTTP generation requests by endpoint and outcome.",
                   f"# TYPE {p}requests_total counter"]
            for (endpoint, outcome), n in sorted(self.requests.items()):
                out.append(f'{p}requests_total{{endpoint="{endpoint}",outcome="{outcome}"}} {n}')
            for name, value, help_ in (
                    ("prompt_tokens_total", self.prompt_tokens, "Prompt tokens of finished requests."),
                    ("prompt_tokens_cached_total", self.cached_tokens, "Prompt tokens reused from a slot's cache."),
                    ("generated_tokens_total", self.generated_tokens, "Tokens generated.")):
                out += [f"# HELP {p}{name} {help_}", f"# TYPE {p}{name} counter", f"{p}{name} {value}"]
            out += [f"# HELP {p}time_to_first_token_seconds Time from request arrival to its first token.",
                    f"# TYPE {p}time_to_first_token_seconds histogram",
                    *self.ttft.lines(f"{p}time_to_first_token_seconds"),
                    f"# HELP {p}time_per_output_token_seconds Time between successive tokens of a request.",
                    f"# TYPE {p}time_per_output_token_seconds histogram",
                    *self.tpot.lines(f"{p}time_per_output_token_seconds")]
        for name, (help_, read) in sorted(self.gauges.items()):
            out += [f"# HELP {p}{name} {help_}", f"# TYPE {p}{name} gauge", f"{p}{name} {_number(read())}"]
        counts = self.expert_counts()
        if counts:
            out += [f"# HELP {p}expert_selections_total Times each expert was routed a token, per layer.",
                    f"# TYPE {p}expert_selections_total counter"]
            for layer, row in enumerate(counts):
                for expert, n in enumerate(row):
                    out.append(f'{p}expert_selections_total{{layer="{layer}",expert="{expert}"}} {n}')
        return "\n".join(out) + "\n"
