"""Prometheus text-format metrics: counters, histograms, and the engine's gauges.

Small enough to write by hand: a counter is a number per label set, a histogram is
cumulative bucket counts plus a sum and a count.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from dataclasses import asdict

from hexin.engine import EngineStats
from hexin.output import Completion

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            cumulative += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
        out += [f"{name}_sum {self.sum}", f"{name}_count {self.count}"]
        return out


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: defaultdict[tuple[str, str], int] = defaultdict(int)  # (route, status)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.ttft = Histogram()
        self.tpot = Histogram()

    def request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, str(status))] += 1

    def completion(self, c: Completion) -> None:
        """Account for a finished generation (any front end)."""
        with self._lock:
            self.prompt_tokens += c.prompt_tokens
            self.cached_tokens += c.cached_tokens
            self.completion_tokens += c.completion_tokens
            if c.ttft_s > 0:
                self.ttft.observe(c.ttft_s)
            if c.completion_tokens > 1 and c.decode_s > 0:
                self.tpot.observe(c.decode_s / (c.completion_tokens - 1))

    def render(self, engine: EngineStats | None) -> str:
        with self._lock:
            lines = [
                "# HELP hexin_requests_total HTTP and WebSocket requests by route and status.",
                "# TYPE hexin_requests_total counter",
            ]
            for (route, status), n in sorted(self.requests.items()):
                lines.append(f'hexin_requests_total{{route="{route}",status="{status}"}} {n}')
            for name, value, help_ in (
                ("hexin_prompt_tokens_total", self.prompt_tokens, "Prompt tokens received."),
                ("hexin_cached_tokens_total", self.cached_tokens, "Prompt tokens from cache."),
                ("hexin_completion_tokens_total", self.completion_tokens, "Tokens generated."),
            ):
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} counter", f"{name} {value}"]
            for name, hist, help_ in (
                ("hexin_time_to_first_token_seconds", self.ttft, "Time to first token."),
                ("hexin_time_per_output_token_seconds", self.tpot, "Latency per output token."),
            ):
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
                lines += hist.lines(name)
        if engine is not None:
            for key, value in asdict(engine).items():
                name = f"hexin_engine_{key}"
                lines += [f"# TYPE {name} gauge", f"{name} {float(value)}"]
        return "\n".join(lines) + "\n"
