"""The server's Prometheus metrics: gauges of running and waiting requests, counters of tokens and
requests, histograms of time to first token and inter-token latency, in the text exposition format."""

from __future__ import annotations

import bisect
import threading

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    def __init__(self, name: str, help_: str):
        self.name, self.help = name, help_
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, v: float):
        self.counts[bisect.bisect_left(BUCKETS, v)] += 1
        self.sum += v

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        acc = 0
        for le, c in zip(BUCKETS, self.counts):
            acc += c
            lines.append(f'{self.name}_bucket{{le="{le}"}} {acc}')
        acc += self.counts[-1]
        lines += [f'{self.name}_bucket{{le="+Inf"}} {acc}', f"{self.name}_sum {self.sum:.6f}",
                  f"{self.name}_count {acc}"]
        return lines


class Metrics:
    """Filled by the engine's `observe` hook and the request handlers; read by GET /metrics."""

    def __init__(self):
        self._lock = threading.Lock()
        self.ttft = Histogram("wasmchord_time_to_first_token_seconds", "Time from request to first token.")
        self.itl = Histogram("wasmchord_inter_token_latency_seconds", "Time between a request's tokens.")
        self.counters = {"wasmchord_requests_total": 0, "wasmchord_request_errors_total": 0,
                         "wasmchord_requests_rejected_total": 0}

    def observe(self, name: str, seconds: float):
        with self._lock:
            (self.ttft if name == "ttft" else self.itl).observe(seconds)

    def count(self, name: str, n: int = 1):
        with self._lock:
            self.counters[name] += n

    def render(self, engine) -> str:
        gauges = {"wasmchord_requests_running": (engine.running, "Requests holding a KV cache slot."),
                  "wasmchord_requests_waiting": (engine.queued, "Requests waiting for a slot."),
                  "wasmchord_slots": (len(engine.slots), "KV cache slots.")}
        totals = {"wasmchord_prompt_tokens_total": (engine.evaluated_tokens, "Prompt tokens evaluated."),
                  "wasmchord_generation_tokens_total": (engine.generated_tokens, "Tokens generated.")}
        lines = []
        for name, (v, h) in gauges.items():
            lines += [f"# HELP {name} {h}", f"# TYPE {name} gauge", f"{name} {v}"]
        with self._lock:
            for name, v in self.counters.items():
                totals[name] = (v, name.replace("wasmchord_", "").replace("_total", "").replace("_", " ") + ".")
            for name, (v, h) in totals.items():
                lines += [f"# HELP {name} {h}", f"# TYPE {name} counter", f"{name} {v}"]
            lines += self.ttft.render() + self.itl.render()
        return "\n".join(lines) + "\n"
