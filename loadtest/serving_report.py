"""What a serving benchmark phase measured: per-request records cut to the measured window,
the server's own step metrics over the same window, the roofline, and the issue's targets.

Inter-token latency needs the tokens of each event, which the OpenAI stream does not carry:
an event carries whatever text the new tokens decoded to, and a token that decodes to nothing
yet (half a UTF-8 character, a special token) rides with a later event. `tokens_per_chunk`
therefore spreads the request's uncounted tokens (usage total minus events) over its events,
each to the event whose gap per token is then the largest: a held-back token makes the gap
of the event that finally carries it about one step longer. The share of tokens so placed is
reported (`tokens_without_own_event`); at zero, every inter-token latency is exact.
"""

from __future__ import annotations

import heapq
from collections import Counter

from prometheus_client.parser import text_string_to_metric_families

# server-side histograms whose mean over the window is reported: (metric, key in the report)
SERVER_HISTOGRAMS = (
    ("loraplex_engine_step_duration_seconds", "step_mean_s"),
    ("loraplex_engine_step_batch_size", "batch_size_mean"),
    ("loraplex_engine_step_distinct_adapters", "distinct_adapters_mean"),
    ("loraplex_engine_step_batched_tokens", "batched_tokens_mean"),
    ("loraplex_inter_token_latency_seconds", "itl_mean_s"),
    ("loraplex_time_to_first_token_seconds", "ttft_mean_s"),
)
SERVER_COUNTERS = (
    ("loraplex_preemptions_total", "preemptions"),
    ('loraplex_adapter_loads_total{source="disk"}', "adapter_loads_disk"),
    ('loraplex_adapter_loads_total{source="host"}', "adapter_loads_host"),
)
MIN_TENANT_RATIO = {32: 0.9, 128: 0.85}  # the issue's targets: tenants' throughput over base's


# --- statistics

def percentiles(values: list[float]) -> dict | None:
    if not values:
        return None
    ordered = sorted(values)
    return {"p50": _quantile(ordered, 0.5), "p90": _quantile(ordered, 0.9), "p99": _quantile(ordered, 0.99),
            "mean": sum(ordered) / len(ordered), "max": ordered[-1], "count": len(ordered)}


def _quantile(ordered: list[float], q: float) -> float:
    pos = q * (len(ordered) - 1)  # linear interpolation between closest ranks
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def tokens_per_chunk(times: list[float], total: int | None) -> list[int]:
    """How many tokens each token-bearing event carried (see the module docstring)."""
    counts = [1] * len(times)
    extra = (total or 0) - len(times)
    if not times or extra <= 0:
        return counts
    if len(times) == 1:
        counts[0] += extra
        return counts
    heap = [(-(times[j] - times[j - 1]), j) for j in range(1, len(times))]
    heapq.heapify(heap)
    for _ in range(extra):
        _, j = heapq.heappop(heap)
        counts[j] += 1
        heapq.heappush(heap, (-(times[j] - times[j - 1]) / counts[j], j))
    return counts


# --- one phase

def summarize_requests(records: list, window: tuple[float, float]) -> dict:
    """Throughput over the window (tokens by arrival time), latencies of the requests that
    started in it (inter-token gaps only where the token arrived in it), and all errors."""
    w0, w1 = window
    span = w1 - w0
    ttft, latency, tpot, itl = [], [], [], []
    window_tokens = completed = measured = placed = total_tokens = 0
    for rec in records:
        started_in = w0 <= rec.start < w1
        counts = tokens_per_chunk(rec.chunk_times, rec.tokens)
        for t, n in zip(rec.chunk_times, counts):
            if w0 <= t < w1:
                window_tokens += n
        for j in range(1, len(rec.chunk_times)):
            if w0 <= rec.chunk_times[j] < w1:
                itl.extend([(rec.chunk_times[j] - rec.chunk_times[j - 1]) / counts[j]] * counts[j])
        if not rec.ok:
            continue
        if rec.end is not None and w0 <= rec.end < w1:
            completed += 1
        if started_in:
            measured += 1
            total_tokens += sum(counts)
            placed += sum(counts) - len(counts)
            if rec.ttft is not None:
                ttft.append(rec.ttft)
            latency.append(rec.end - rec.start)
            if rec.ttft is not None and sum(counts) > 1:
                tpot.append((rec.end - rec.start - rec.ttft) / (sum(counts) - 1))
    errors = Counter(rec.error for rec in records if rec.error is not None)
    return {
        "window_s": span, "output_tokens_per_s": window_tokens / span, "requests_per_s": completed / span,
        "requests": {"sent": len(records), "ok": sum(rec.ok for rec in records), "measured": measured,
                     "completed_in_window": completed},
        "ttft_s": percentiles(ttft), "itl_s": percentiles(itl), "tpot_s": percentiles(tpot),
        "latency_s": percentiles(latency),
        "output_tokens_mean": total_tokens / measured if measured else None,
        "tokens_without_own_event": placed / total_tokens if total_tokens else None,
        "errors": dict(errors), "error_examples": _error_examples(records),
    }


def _error_examples(records: list, limit: int = 3) -> dict:
    examples: dict[str, list[str]] = {}
    for rec in records:
        if rec.error is not None and len(examples.setdefault(rec.error, [])) < limit and rec.message:
            examples[rec.error].append(rec.message)
    return {k: v for k, v in examples.items() if v}


def record_summary(rec) -> dict:
    """One request in the JSON (the first request after /ready)."""
    return {"ok": rec.ok, "status": rec.status, "error": rec.error, "message": rec.message, "ttft_s": rec.ttft,
            "latency_s": None if rec.end is None else rec.end - rec.start, "tokens": rec.tokens,
            "events": len(rec.chunk_times)}


# --- the server's metrics

def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {sample name: value summed over label sets, 'name{label="v"}': value}."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
            for label, value in sample.labels.items():
                if label != "le":
                    key = f'{sample.name}{{{label}="{value}"}}'
                    values[key] = values.get(key, 0.0) + sample.value
    return values


def build_info(text: str) -> dict | None:
    """Labels of loraplex_build_info: the configuration the server resolved (slots, sequences)."""
    for family in text_string_to_metric_families(text):
        if family.name == "loraplex_build_info" and family.samples:
            return dict(family.samples[0].labels)
    return None


def server_window(before: dict | None, after: dict | None) -> dict | None:
    """Means of the step histograms and counter increments between two scrapes."""
    if not before or not after:
        return None

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    out: dict = {"steps": delta("loraplex_engine_step_duration_seconds_count")}
    for metric, key in SERVER_HISTOGRAMS:
        count = delta(f"{metric}_count")
        out[key] = delta(f"{metric}_sum") / count if count else None
    for metric, key in SERVER_COUNTERS:
        out[key] = delta(metric)
    return out


# --- targets

def phase_targets(phase: dict, base_tps: dict[int, float], engine: dict | None) -> list[dict]:
    """The issue's per-phase targets that apply to this phase."""
    out = []
    roof = phase.get("roofline") or {}
    itl = (phase.get("itl_s") or {}).get("p50")
    if itl is not None and roof.get("step_s"):
        out.append(_target("ITL p50 / roofline step", itl / roof["step_s"], 1.25, "<="))
    base = base_tps.get(phase["concurrency"])
    if phase["tenants"] and base:
        need = MIN_TENANT_RATIO.get(phase["tenants"], 0.9 if phase["tenants"] <= 32 else 0.85)
        out.append(_target("tokens/s / base tokens/s", phase["output_tokens_per_s"] / base, need, ">="))
    ttft = (phase.get("ttft_s") or {}).get("p50")
    if phase["concurrency"] == 64 and ttft is not None:
        out.append(_target("TTFT p50 (s)", ttft, 0.25, "<="))
    step = (phase.get("server") or {}).get("step_mean_s")
    alone = _engine_step(engine, phase)
    if step and alone:
        out.append(_target("server step mean / engine-alone step", step / alone, 1.1, "<="))
    loop = _engine_closed_loop(engine, phase)
    if loop:  # the same ratio against the same workload (decodes and prefills mixed) without the server
        out.append(_target("engine-alone closed loop tokens/s / server tokens/s", loop["tokens_per_s"]
                           / phase["output_tokens_per_s"], 1.1, "<="))
    return out


def _engine_closed_loop(engine: dict | None, phase: dict) -> dict | None:
    """The engine-alone closed loop of the same concurrency and adapter case, when one ran."""
    if not engine or engine.get("error") or engine.get("batch") != phase["concurrency"]:
        return None
    loops = engine.get("closed_loop") or {}
    if not phase["tenants"]:
        return loops.get("base")
    return loops.get("adapters") if phase["tenants"] == engine.get("num_adapters") else None


def _engine_step(engine: dict | None, phase: dict) -> float | None:
    """The engine-alone step of the same batch and adapter case, when one was measured."""
    if not engine or engine.get("error") or engine.get("batch") != phase["concurrency"]:
        return None
    if not phase["tenants"]:
        return engine.get("base_step_s")
    return engine.get("adapters_step_s") if phase["tenants"] == engine.get("num_adapters") else None


def _target(name: str, value: float, limit: float, sense: str) -> dict:
    met = value <= limit if sense == "<=" else value >= limit
    return {"name": name, "value": value, "target": f"{sense} {limit:g}", "met": met}


def run_targets(first_request: dict | None, engine: dict | None, engine_roofline: dict | None) -> list[dict]:
    """Targets of the run as a whole: the first request, the engine alone against its roofline."""
    out = []
    if first_request and first_request.get("ttft_s") is not None:
        out.append(_target("first request after /ready: TTFT (s)", first_request["ttft_s"], 1.0, "<="))
    if engine and engine_roofline and engine_roofline.get("step_s") and engine.get("base_step_s"):
        out.append(_target("engine alone base step / roofline", engine["base_step_s"] / engine_roofline["step_s"],
                           1.15, "<="))
    return out


def all_targets(result: dict) -> list[dict]:
    """The run's targets, then each phase's (tenants against the base phase of the same concurrency)."""
    engine = result.get("engine_alone")
    phases = [p for p in result.get("phases", []) if not p.get("skipped")]
    base_tps = {p["concurrency"]: p["output_tokens_per_s"] for p in phases if not p["tenants"]}
    targets = [{**t, "phase": "run"}
               for t in run_targets(result.get("first_request"), engine, (engine or {}).get("roofline"))]
    for p in phases:
        targets += [{**t, "phase": p["name"]} for t in phase_targets(p, base_tps, engine)]
    return targets


# --- the table

def format_table(phases: list[dict]) -> str:
    head = ("phase", "tok/s", "req/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "lat p50", "step",
            "batch", "roof", "ITL/roof", "errors")
    rows = [head]
    for p in phases:
        roof = (p.get("roofline") or {}).get("step_s")
        itl50 = _get(p, "itl_s", "p50")
        server = p.get("server") or {}
        latencies = [_get(p, "ttft_s", "p50"), _get(p, "ttft_s", "p99"), itl50, _get(p, "itl_s", "p99"),
                     _get(p, "latency_s", "p50"), server.get("step_mean_s")]
        rows.append((p["name"], f"{p['output_tokens_per_s']:.0f}", f"{p['requests_per_s']:.2f}",
                     *map(fmt_ms, latencies), _num(server.get("batch_size_mean")), fmt_ms(roof),
                     f"{itl50 / roof:.2f}x" if itl50 and roof else "-", str(sum(p["errors"].values()))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def phase_line(phase: dict) -> str:
    server = phase.get("server") or {}
    errors = f"errors {phase['errors']}" if phase["errors"] else "no errors"
    return (f"phase {phase['name']}: {phase['output_tokens_per_s']:.0f} tok/s, "
            f"TTFT p50 {fmt_ms(_get(phase, 'ttft_s', 'p50'))}, ITL p50 {fmt_ms(_get(phase, 'itl_s', 'p50'))}, "
            f"server step {fmt_ms(server.get('step_mean_s'))} at batch {_num(server.get('batch_size_mean'))}, {errors}")


def format_targets(targets: list[dict]) -> str:
    return "\n".join(f"  {'MET   ' if t['met'] else 'MISSED'} {t.get('phase', 'run'):<16} {t['name']}: "
                     f"{t['value']:.3g} (target {t['target']})" for t in targets)


def _get(phase: dict, key: str, stat: str):
    return (phase.get(key) or {}).get(stat)


def fmt_ms(seconds) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.1f} ms"


def _num(value) -> str:
    return "-" if value is None else f"{value:.1f}"

