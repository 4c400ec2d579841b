"""Server metrics: Prometheus text exposition (format 0.0.4) and the same numbers as JSON.

Histograms (seconds, per model name -- the adapter or the base -- up to :data:`MAX_MODEL_LABELS` names, then
``"other"``): ``nora_time_to_first_token_seconds``, ``nora_inter_token_latency_seconds``,
``nora_e2e_request_latency_seconds``; ``nora_batch_size`` (rows per decode step). Counters: requests by finish reason,
prompt and generated tokens, prefill groups, decode steps, adapter loads / evictions, rejections by reason. Gauges
(read when scraped): queue depth, running rows, adapters in memory, bytes of stacked adapter weights.

No client library: the text format is a few lines per series, and the server should not need another dependency.
"""

from __future__ import annotations

import math
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import Any

#: latency buckets in seconds (TTFT and end-to-end reach seconds on a CPU; inter-token latency is ms-scale)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40, 80)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MAX_MODEL_LABELS = 64


class Histogram:
    """A Prometheus histogram with one label (or none): cumulative buckets, sum and count per label value."""

    def __init__(self, name: str, help_text: str, buckets: Sequence[float], label: str | None = None) -> None:
        self.name, self.help, self.buckets, self.label = name, help_text, tuple(buckets), label
        self.counts: dict[str, list[int]] = defaultdict(lambda: [0] * (len(self.buckets) + 1))
        self.sums: dict[str, float] = defaultdict(float)
        self.values: dict[str, list[float]] = defaultdict(list)  # kept (bounded) for the JSON percentiles
        self.keep = 4096

    def observe(self, value: float, label: str = "") -> None:
        counts = self.counts[label]
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                counts[i] += 1
                break
        else:
            counts[-1] += 1
        self.sums[label] += value
        recent = self.values[label]
        recent.append(value)
        if len(recent) > self.keep:
            del recent[: len(recent) - self.keep]

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for label, counts in sorted(self.counts.items()):
            base = f'{self.label}="{_escape(label)}"' if self.label else ""
            total = 0
            for edge, count in zip((*self.buckets, math.inf), counts):
                total += count
                le = "+Inf" if edge == math.inf else _number(edge)
                lines.append(f'{self.name}_bucket{{{base + "," if base else ""}le="{le}"}} {total}')
            tail = f"{{{base}}}" if base else ""
            lines.append(f"{self.name}_sum{tail} {_number(self.sums[label])}")
            lines.append(f"{self.name}_count{tail} {total}")
        return lines

    def summary(self) -> dict[str, float]:
        """Count, mean and p50 / p90 / p99 over all labels (from the most recent observations)."""
        values = sorted(v for vs in self.values.values() for v in vs)
        count = sum(sum(c) for c in self.counts.values())
        if not values:
            return {"count": count}
        return {"count": count, "mean": sum(values) / len(values)} | {
            f"p{q}": percentile(values, q / 100) for q in (50, 90, 99)
        }


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile ``q`` in [0, 1] of already sorted values."""
    if not sorted_values:
        return math.nan
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class ServeMetrics:
    """Everything ``/metrics`` reports; the scheduler calls the recording methods from its thread.

    Args:
        gauges: ``{name: (help, read)}`` read at scrape time (queue depth, running rows, pool state).
        counters: ``{name: (help, read)}`` counters owned elsewhere (the pool's loads and evictions).
    """

    def __init__(
        self,
        gauges: dict[str, tuple[str, Callable[[], float]]] | None = None,
        counters: dict[str, tuple[str, Callable[[], float]]] | None = None,
    ) -> None:
        self.lock = threading.Lock()
        self.gauges = gauges or {}
        self.external_counters = counters or {}
        self.ttft = Histogram("nora_time_to_first_token_seconds", "Time to first token.", LATENCY_BUCKETS, "model")
        self.itl = Histogram("nora_inter_token_latency_seconds", "Time between tokens.", LATENCY_BUCKETS, "model")
        self.e2e = Histogram("nora_e2e_request_latency_seconds", "Request latency.", LATENCY_BUCKETS, "model")
        self.batch = Histogram("nora_batch_size", "Rows per decode step.", BATCH_BUCKETS)
        self.requests: Counter[tuple[str, str]] = Counter()  # (model, finish reason)
        self.rejections: Counter[str] = Counter()
        self.tokens = {"prompt": 0, "generated": 0}
        self.groups = 0
        self.steps = 0
        self.max_batch = 0
        self.batch_sizes: Counter[int] = Counter()
        self.models: set[str] = set()

    def _model(self, req: Any) -> str:
        name = req.model or req.adapter or "base"
        if name in self.models:
            return name
        if len(self.models) < MAX_MODEL_LABELS:
            self.models.add(name)
            return name
        return "other"

    # -- recording (scheduler thread) -----------------------------------------------------------------------------
    def group_admitted(self, rows: int, prompt_tokens: int) -> None:
        with self.lock:
            self.groups += 1
            self.tokens["prompt"] += prompt_tokens
            self.max_batch = max(self.max_batch, rows)

    def decode_step(self, rows: int) -> None:
        with self.lock:
            self.steps += 1
            self.max_batch = max(self.max_batch, rows)
            self.batch.observe(rows)
            self.batch_sizes[rows] += 1

    def token(self, req: Any, now: float) -> None:
        with self.lock:
            self.tokens["generated"] += 1
            model = self._model(req)
            if req.first_token_at is None:
                self.ttft.observe(now - req.enqueued, model)
            else:
                self.itl.observe(now - req.last_token_at, model)

    def finished(self, req: Any, reason: str, now: float) -> None:
        with self.lock:
            model = self._model(req)
            self.requests[(model, reason)] += 1
            if reason in ("stop", "length"):
                self.e2e.observe(now - req.enqueued, model)

    def rejected(self, reason: str) -> None:
        with self.lock:
            self.rejections[reason] += 1

    # -- reading ----------------------------------------------------------------------------------------------------
    def prometheus(self) -> str:
        """The text exposition format (``Content-Type: text/plain; version=0.0.4``)."""
        with self.lock:
            lines: list[str] = []
            counter = _series_writer(lines, "counter")
            counter("nora_requests_total", "Finished requests by finish reason.", "model,finish_reason",
                    {(m, r): n for (m, r), n in self.requests.items()})  # fmt: skip
            counter("nora_prompt_tokens_total", "Prompt tokens prefilled.", None, {(): self.tokens["prompt"]})
            counter("nora_generation_tokens_total", "Tokens generated.", None, {(): self.tokens["generated"]})
            counter("nora_prefill_groups_total", "Groups of requests admitted together.", None, {(): self.groups})
            counter("nora_decode_steps_total", "Decode forward passes.", None, {(): self.steps})
            counter("nora_rejections_total", "Requests refused or failed before running, by reason.", "reason",
                    {(r,): n for r, n in self.rejections.items()})  # fmt: skip
            for name, (help_text, read) in self.external_counters.items():
                counter(name, help_text, None, {(): read()})
            gauge = _series_writer(lines, "gauge")
            for name, (help_text, read) in self.gauges.items():
                gauge(name, help_text, None, {(): read()})
            for hist in (self.ttft, self.itl, self.e2e, self.batch):
                lines.extend(hist.render())
        return "\n".join(lines) + "\n"

    def snapshot(self) -> dict[str, Any]:
        """The JSON view: counters, gauges, and latency percentiles in seconds."""
        with self.lock:
            finished = Counter()
            for (_, reason), n in self.requests.items():
                finished[reason] += n
            out: dict[str, Any] = {
                "requests_total": finished["stop"] + finished["length"],
                "requests_failed": finished["error"],
                "requests_cancelled": finished["cancelled"],
                "batches_total": self.groups,
                "steps_total": self.steps,
                "tokens_generated": self.tokens["generated"],
                "prompt_tokens": self.tokens["prompt"],
                "max_batch_size_seen": self.max_batch,
                "batch_size_hist": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "rejections": dict(self.rejections),
                "ttft_s": self.ttft.summary(),
                "inter_token_s": self.itl.summary(),
                "e2e_s": self.e2e.summary(),
            }
        for name, (_, read) in {**self.gauges, **self.external_counters}.items():
            out[name.removeprefix("nora_").removesuffix("_total")] = read()
        return out


def _series_writer(lines: list[str], kind: str) -> Callable[..., None]:
    def write(name: str, help_text: str, labels: str | None, values: dict[tuple, float]) -> None:
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
        keys = labels.split(",") if labels else []
        for label_values, value in sorted(values.items()):
            tags = ",".join(f'{k}="{_escape(str(v))}"' for k, v in zip(keys, label_values))
            lines.append(f"{name}{{{tags}}} {_number(value)}" if tags else f"{name} {_number(value)}")

    return write


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) and not float(value).is_integer() else str(int(value))
