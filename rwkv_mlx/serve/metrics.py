"""Counters, gauges and histograms, exposed as Prometheus text (GET /metrics).

Written from the engine thread and the HTTP thread, hence one lock; no
dependency on prometheus_client for the few dozen lines of its text format.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

PREFIX = "rwkv_serve_"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple], float] = defaultdict(float)
        self._gauges: dict[str, float] = {}
        self._hist: dict[str, list] = {}  # name -> [bucket counts, sum, count]
        self._help: dict[str, tuple[str, str]] = {}

    def _describe(self, name: str, kind: str, text: str) -> None:
        self._help.setdefault(name, (kind, text))

    def inc(self, name: str, value: float = 1.0, help: str = "", **labels) -> None:
        with self._lock:
            self._describe(name, "counter", help)
            self._counters[(name, tuple(sorted(labels.items())))] += value

    def set(self, name: str, value: float, help: str = "") -> None:
        with self._lock:
            self._describe(name, "gauge", help)
            self._gauges[name] = float(value)

    def observe(self, name: str, seconds: float, help: str = "") -> None:
        with self._lock:
            self._describe(name, "histogram", help)
            h = self._hist.setdefault(name, [[0] * (len(LATENCY_BUCKETS) + 1), 0.0, 0])
            h[0][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            h[1] += seconds
            h[2] += 1

    def counter(self, name: str, **labels) -> float:
        with self._lock:
            return self._counters.get((name, tuple(sorted(labels.items()))), 0.0)

    def gauge(self, name: str) -> float:
        with self._lock:
            return self._gauges.get(name, 0.0)

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, (kind, text) in sorted(self._help.items()):
                full = PREFIX + name
                lines += [f"# HELP {full} {text}", f"# TYPE {full} {kind}"]
                if kind == "counter":
                    for (n, labels), v in sorted(self._counters.items()):
                        if n == name:
                            lines.append(f"{full}{_labels(labels)} {v:g}")
                elif kind == "gauge":
                    lines.append(f"{full} {self._gauges[name]:g}")
                else:
                    counts, total, n = self._hist[name]
                    running = 0
                    for bound, c in zip((*LATENCY_BUCKETS, float("inf")), counts):
                        running += c
                        le = "+Inf" if bound == float("inf") else f"{bound:g}"
                        lines.append(f'{full}_bucket{{le="{le}"}} {running}')
                    lines += [f"{full}_sum {total:g}", f"{full}_count {n}"]
        return "\n".join(lines) + "\n"


def _labels(labels: tuple) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v)}"' for k, v in labels)
    return "{" + inner + "}"
