"""Counters and histograms the engine and server update, rendered as Prometheus text for /metrics."""

from __future__ import annotations

import threading
import time
from collections import deque

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, window_s: float = 10.0):
        self._lock = threading.Lock()
        self.counters: dict[tuple[str, tuple], float] = {}  # (name, sorted label items) -> value
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self.window_s = window_s
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps, for tokens/s
        self.gauges: dict[str, float] = {}  # fixed values (KV bytes)
        self.live = lambda: {}  # current values, computed when rendered (the engine sets this)

    def inc(self, name: str, value: float = 1, **labels) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self.counters[key] = self.counters.get(key, 0) + value

    def get(self, name: str, **labels) -> float:
        return self.counters.get((name, tuple(sorted(labels.items()))), 0)

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft_sum += seconds
            for i, bound in enumerate(TTFT_BUCKETS):
                if seconds <= bound:
                    self.ttft_counts[i] += 1
                    break
            else:
                self.ttft_counts[-1] += 1

    def generated(self, tokens: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, tokens))
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            total = sum(n for t, n in self._recent if t >= now - self.window_s)
        return total / self.window_s

    def render(self) -> str:
        help_text = {
            "herd_http_requests_total": "HTTP requests answered, by endpoint and status code",
            "herd_requests_total": "engine requests finished, by finish reason",
            "herd_prompt_tokens_total": "prompt tokens prefilled",
            "herd_generation_tokens_total": "tokens generated",
        }
        lines = []
        with self._lock:
            names = sorted({n for n, _ in self.counters} | set(help_text))
            for name in names:
                lines += [f"# HELP {name} {help_text.get(name, name)}", f"# TYPE {name} counter"]
                for (n, labels), value in sorted(self.counters.items()):
                    if n == name:
                        lab = ",".join(f'{k}="{v}"' for k, v in labels)
                        lines.append(f"{name}{{{lab}}} {value:g}" if lab else f"{name} {value:g}")
                if not any(n == name for n, _ in self.counters):
                    lines.append(f"{name} 0")
            lines += ["# HELP herd_time_to_first_token_seconds time from arrival to the first generated token",
                      "# TYPE herd_time_to_first_token_seconds histogram"]
            cumulative = 0
            for bound, count in zip(TTFT_BUCKETS, self.ttft_counts):
                cumulative += count
                lines.append(f'herd_time_to_first_token_seconds_bucket{{le="{bound}"}} {cumulative}')
            cumulative += self.ttft_counts[-1]
            lines += [f'herd_time_to_first_token_seconds_bucket{{le="+Inf"}} {cumulative}',
                      f"herd_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
                      f"herd_time_to_first_token_seconds_count {cumulative}"]
            gauges = dict(self.gauges)
        gauges.update(self.live())
        gauges["herd_generation_tokens_per_second"] = self.tokens_per_second()
        gauge_help = {
            "herd_generation_tokens_per_second": f"tokens generated per second over the last {self.window_s:g} s",
            "herd_queue_length": "requests waiting to run",
            "herd_running_requests": "requests running (holding KV blocks)",
            "herd_kv_cache_usage_ratio": "KV cache blocks in use / blocks in the cache",
            "herd_kv_cache_bytes": "bytes the KV cache may use (its blocks' pages are touched only when written)",
            "herd_kv_blocks_in_use": "KV cache blocks held by running requests",
            "herd_kv_blocks_free": "KV cache blocks no running request holds (cached prefixes among them)",
            "herd_kv_blocks_cached_idle": "free blocks still holding a cached prefix (evicted least recently used)",
            "herd_kv_block_bytes": "bytes of one KV cache block (all layers)",
            "herd_prefix_cache_queries_total": "prompt tokens looked up in the prefix cache",
            "herd_prefix_cache_hits_total": "prompt tokens found in the prefix cache (not computed)",
        }
        for name in sorted(gauges):
            lines += [f"# HELP {name} {gauge_help.get(name, name)}", f"# TYPE {name} gauge",
                      f"{name} {gauges[name]:g}"]
        return "\n".join(lines) + "\n"
