"""Every Prometheus metric of loraplex, defined in one place.

Naming: one prefix (`loraplex_`), base units in the name, `_total` on counters, hit and query
counters rather than rates. No customer or adapter labels, with one exception the Gateway API
Inference Extension requires: the LoRA info gauge, whose `running_lora_adapters` and
`waiting_lora_adapters` labels list customer ids (at most `max_lora` of each, and only one
series at a time, so its cardinality is bounded by the GPU pool size).

Three kinds of sources:
- the HTTP layer counts requests and observes each generation's latencies from its stream
  (`RequestObservation`), on the event loop;
- the engine thread observes each step (batch size, distinct adapters, tokens, duration) and
  each sequence's queue time through `observe_step` / `observe_queue_time`;
- gauges of the engine's state (running, waiting, KV cache usage, adapter cache tiers) are read
  at scrape time from an `EngineSnapshot` (`bind_engine`), so they are never stale.

The endpoint picker reads vLLM's names by default; `Settings.gateway_*_metric` export the same
values under those names (configurable, several per value, or none), beside the originals.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from server.config import Settings

LORA_INFO_LABELS = ("max_lora", "running_lora_adapters", "waiting_lora_adapters")

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
_REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_ADAPTER_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
_TOKEN_COUNT_BUCKETS = (1, 8, 32, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's state at scrape time (built by the service; plain values)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks in use, 0..1
    num_preemptions: int
    num_steps: int
    max_loras: int
    running_adapters: list[str]  # customer ids of the adapters in device slots
    waiting_adapters: list[str]  # customer ids of waiting requests whose adapter is not in a slot
    cache: Any = None  # server.lora.cache.CacheStats (duck-typed: no torch import here)
    memory: dict | None = None  # server.model.quantized.device_memory: weight format and bytes, KV cache, adapter pool
    prefix_cache_queried_tokens: int = 0  # prompt tokens looked up in the prefix cache at admission
    prefix_cache_hit_tokens: int = 0  # of those, found cached (not computed again)


class Metrics:
    """The registry and every metric object; one per app (tests build several)."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None):
        self.settings = settings
        self.registry = registry = registry if registry is not None else CollectorRegistry()
        self.http_requests = Counter(
            "loraplex_http_requests", "HTTP requests answered, by route template and status class",
            ["endpoint", "status_class"], registry=registry)
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens of finished generations",
                                     registry=registry)
        self.generation_tokens = Counter("loraplex_generation_tokens", "Tokens generated", registry=registry)
        self.generations = Counter(
            "loraplex_generations", "Finished generations (one per choice), by finish reason",
            ["finish_reason"], registry=registry)
        self.time_to_first_token = Histogram(
            "loraplex_time_to_first_token_seconds", "From the request's arrival to its first token",
            buckets=_LATENCY_BUCKETS, registry=registry)
        self.inter_token_latency = Histogram(
            "loraplex_inter_token_latency_seconds", "Between consecutive tokens of one generation",
            buckets=_TOKEN_LATENCY_BUCKETS, registry=registry)
        self.request_duration = Histogram(
            "loraplex_e2e_request_latency_seconds", "From the request's arrival to its last token",
            buckets=_REQUEST_BUCKETS, registry=registry)
        self.queue_time = Histogram(
            "loraplex_request_queue_time_seconds", "From entering the engine queue to the first scheduled step",
            buckets=_LATENCY_BUCKETS, registry=registry)
        self.step_duration = Histogram(
            "loraplex_engine_step_duration_seconds", "One engine step (schedule, forward, sample)",
            buckets=_STEP_BUCKETS, registry=registry)
        self.step_batch_size = Histogram(
            "loraplex_engine_step_batch_size", "Sequences in one step", buckets=_BATCH_BUCKETS, registry=registry)
        self.step_adapters = Histogram(
            "loraplex_engine_step_distinct_adapters", "Distinct LoRA adapters in one step (base model not counted)",
            buckets=_ADAPTER_BUCKETS, registry=registry)
        self.step_tokens = Histogram(
            "loraplex_engine_step_batched_tokens", "Tokens fed in one step (prefill chunks and decodes)",
            buckets=_TOKEN_COUNT_BUCKETS, registry=registry)
        self.rejected_requests = Counter(
            "loraplex_requests_rejected", "Requests refused with 429 by admission control, by the bound reached "
            "(queue_full, tenant_queue_full, tenant_concurrency, queued_tokens, tenant_queued_tokens)", ["reason"], registry=registry)
        self.adapter_uploads = Counter(
            "loraplex_adapter_uploads", "Adapter uploads by result (stored, invalid_customer_id, invalid_adapter, "
            "too_large, store_full, bad_request, error)", ["result"], registry=registry)
        self.build_info = Gauge(
            "loraplex_build_info", "Always 1; labels describe the build and the served configuration",
            ["version", "model", "device", "dtype", "max_loras", "max_lora_rank", "max_num_seqs", "tensor_parallel_size"],
            registry=registry)

    # --- HTTP layer
    def count_http(self, endpoint: str, status: int) -> None:
        self.http_requests.labels(endpoint, f"{status // 100}xx").inc()

    def count_rejected(self, reason: str) -> None:
        self.rejected_requests.labels(reason).inc()

    def count_upload(self, result: str) -> None:
        self.adapter_uploads.labels(result).inc()

    def start_request(self, arrived_at: float | None = None) -> "RequestObservation":
        """`arrived_at`: time.monotonic() when the HTTP request arrived (default: now)."""
        return RequestObservation(self, arrived_at if arrived_at is not None else time.monotonic())

    # --- engine thread
    def observe_step(self, num_seqs: int, num_adapters: int, num_tokens: int, seconds: float) -> None:
        self.step_batch_size.observe(num_seqs)
        self.step_adapters.observe(num_adapters)
        self.step_tokens.observe(num_tokens)
        self.step_duration.observe(seconds)

    def observe_queue_time(self, seconds: float) -> None:
        self.queue_time.observe(seconds)

    # --- wiring (lifespan)
    def set_build_info(self, *, model: str, device: str, dtype: str, max_loras: int, max_num_seqs: int) -> None:
        """Labels of the served configuration, with the limits the engine resolved (auto defaults)."""
        self.build_info.labels(_version(), model, device, dtype, str(max_loras), str(self.settings.max_lora_rank),
                               str(max_num_seqs), str(self.settings.tensor_parallel_size)).set(1)

    def bind_engine(self, snapshot: Callable[[], EngineSnapshot]) -> None:
        self.registry.register(_EngineCollector(self.settings, snapshot))


@dataclass
class RequestObservation:
    """The latencies of one generation, observed from its stream events (event loop)."""

    metrics: Metrics
    arrived_at: float = field(default_factory=time.monotonic)
    last_token_at: float | None = None

    def on_tokens(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        now = time.monotonic()
        if self.last_token_at is None:
            self.metrics.time_to_first_token.observe(now - self.arrived_at)
            num_tokens -= 1  # the first token has no predecessor
        else:
            gap = (now - self.last_token_at) / num_tokens
            for _ in range(num_tokens):
                self.metrics.inter_token_latency.observe(gap)
        self.last_token_at = now

    def on_finish(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        m = self.metrics
        m.request_duration.observe(time.monotonic() - self.arrived_at)
        m.prompt_tokens.inc(prompt_tokens)
        m.generation_tokens.inc(completion_tokens)
        m.generations.labels(finish_reason).inc()


class _EngineCollector:
    """Gauges and cumulative counters read from the engine at scrape time."""

    def __init__(self, settings: Settings, snapshot: Callable[[], EngineSnapshot]):
        self.settings, self.snapshot = settings, snapshot

    def collect(self):
        s = self.snapshot()
        names = self.settings.gateway_metric_names
        yield _gauge("loraplex_num_requests_running", "Sequences in the running batch", s.num_running)
        for name in names("running"):
            yield _gauge(name, "Requests running (alias of loraplex_num_requests_running)", s.num_running)
        yield _gauge("loraplex_num_requests_waiting", "Sequences queued, not yet running", s.num_waiting)
        for name in names("queue"):
            yield _gauge(name, "Requests queued (alias of loraplex_num_requests_waiting)", s.num_waiting)
        yield _gauge("loraplex_kv_cache_usage_ratio", "Fraction of KV cache blocks in use", s.kv_cache_usage)
        for name in names("kv_usage"):
            yield _gauge(name, "KV cache usage, 0..1 (alias of loraplex_kv_cache_usage_ratio)", s.kv_cache_usage)
        for name in ["loraplex_lora_requests_info", *names("lora_info")]:
            info = GaugeMetricFamily(name, "LoRA adapters in device slots and waiting (value: Unix time of this "
                                     "reading)", labels=LORA_INFO_LABELS)
            info.add_metric([str(s.max_loras), ",".join(s.running_adapters), ",".join(s.waiting_adapters)],
                            time.time())
            yield info
        yield _counter("loraplex_preemptions", "Sequences preempted for KV blocks (recomputed later)",
                       s.num_preemptions)
        yield _counter("loraplex_engine_steps", "Engine steps run", s.num_steps)
        yield _counter("loraplex_prefix_cache_queries", "Tokens looked up in the KV prefix cache when a sequence "
                       "is admitted (hit ratio: rate of loraplex_prefix_cache_hits_total over this)",
                       s.prefix_cache_queried_tokens)
        yield _counter("loraplex_prefix_cache_hits", "Tokens found in the KV prefix cache (their keys and values "
                       "not computed again)", s.prefix_cache_hit_tokens)
        if s.cache is not None:
            yield from _cache_metrics(s.cache)
        if s.memory is not None:
            yield from _memory_metrics(s.memory)


def _cache_metrics(stats):
    tiers = {"host": stats.host, "device": stats.device}
    for attr, name, doc in (
        ("queries", "loraplex_adapter_cache_queries", "Adapter cache lookups, by tier"),
        ("hits", "loraplex_adapter_cache_hits", "Adapter cache hits, by tier"),
        ("evictions", "loraplex_adapter_cache_evictions", "Adapters evicted, by tier"),
    ):
        family = CounterMetricFamily(name, doc, labels=["tier"])
        for tier, tier_stats in tiers.items():
            family.add_metric([tier], getattr(tier_stats, attr))
        yield family
    resident = GaugeMetricFamily("loraplex_adapters_resident", "Adapters held, by tier", labels=["tier"])
    resident_bytes = GaugeMetricFamily("loraplex_adapters_resident_bytes", "A and B bytes of the adapters held, "
                                       "by tier", labels=["tier"])
    for tier, tier_stats in tiers.items():
        resident.add_metric([tier], tier_stats.resident)
        resident_bytes.add_metric([tier], tier_stats.resident_bytes)
    yield resident
    yield resident_bytes
    loads = CounterMetricFamily("loraplex_adapter_loads", "Adapter loads completed, by source (disk: file to "
                                "host RAM; host: host RAM to a device slot)", labels=["source"])
    seconds = CounterMetricFamily("loraplex_adapter_load_seconds", "Seconds spent in adapter loads, by source",
                                  labels=["source"])
    for source in sorted(stats.loads):
        loads.add_metric([source], stats.loads[source])
        seconds.add_metric([source], stats.load_seconds.get(source, 0.0))
    yield loads
    yield seconds
    yield _counter("loraplex_adapter_load_failures", "Adapter loads that failed", stats.load_failures)
    yield _gauge("loraplex_adapter_loads_in_flight", "Adapter loads running now", stats.loading)
    yield _gauge("loraplex_adapters_pinned", "Adapters pinned in device slots by the requests running now "
                 "(a pinned adapter is never evicted)", stats.pinned)


def _memory_metrics(memory: dict):
    weights = GaugeMetricFamily("loraplex_model_weight_bytes", "Bytes of the base model's weights on the device, "
                                "labelled with their format (bf16, fp16, fp32; nf4, fp8: --quantize)", labels=["format"])
    weights.add_metric([memory["weight_format"]], memory["weight_bytes"])
    yield weights
    yield _gauge("loraplex_kv_cache_bytes", "Bytes of the paged KV cache on the device", memory["kv_cache_bytes"])
    yield _gauge("loraplex_adapter_pool_bytes", "Bytes of the device's adapter slot pool", memory["adapter_pool_bytes"])


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _version() -> str:
    try:
        return metadata.version("loraplex")
    except metadata.PackageNotFoundError:
        return "unknown"
