"""The load generator's report: client-side latencies and throughput, SLO attainment, errors by
status, what the server's own counters saw, and the raw samples the plots are drawn from.

Latencies and throughput are `serving_report.summarize_requests` over the measured window
(after the warm-up, up to the end of sending): TTFT, inter-token latency, end-to-end latency
percentiles, output tokens and requests a second. SLO attainment counts, among requests sent
in the window, those that succeeded with TTFT <= the TTFT bound and a mean time per output
token after the first <= the ITL bound (a failed request misses). `server` holds the counters
(and histogram sums and counts) that moved between a /metrics scrape before the run and one
after (every request of the run, window or not), so a report can be checked against the
server's own books; `server_means` the server's own mean latencies over the run. Two meanings
of "ITL" meet here: `itl_s` is every token-to-token gap, the SLO's ITL bound applies to a
request's mean gap after its first token (what aiperf and guidellm call ITL; `tpot_s`).
"""

from __future__ import annotations

from collections import Counter

from loadtest.serving_report import parse_metrics, summarize_requests, tokens_per_chunk

COUNTER_PREFIXES = ("loraplex_", "vllm:")  # whose counters `server` keeps


def slo_attainment(records: list, window: tuple[float, float], ttft_s: float | None, itl_s: float | None) -> dict | None:
    if ttft_s is None and itl_s is None:
        return None
    w0, w1 = window
    sent = [rec for rec in records if w0 <= rec.start < w1]
    met = 0
    for rec in sent:
        if not rec.ok or rec.ttft is None:
            continue
        n = sum(tokens_per_chunk(rec.chunk_times, rec.tokens))
        tpot = (rec.end - rec.start - rec.ttft) / (n - 1) if n > 1 else 0.0
        if (ttft_s is None or rec.ttft <= ttft_s) and (itl_s is None or tpot <= itl_s):
            met += 1
    return {"ttft_s": ttft_s, "itl_s": itl_s, "requests": len(sent), "met": met,
            "attainment": met / len(sent) if sent else None}


def errors_by_status(records: list) -> dict[str, int]:
    """HTTP status of every request (200 included), "none" where no response arrived; a 200
    whose stream broke counts under its error kind."""
    counts = Counter()
    for rec in records:
        if rec.status == 200 and rec.error is not None:
            counts[f"200 {rec.error}"] += 1
        else:
            counts[str(rec.status) if rec.status is not None else "none"] += 1
    return dict(counts)


def per_tenant(records: list) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for rec in records:
        row = out.setdefault(rec.tenant or "(base model)", {"requests": 0, "ok": 0, "tokens": 0})
        row["requests"] += 1
        row["ok"] += rec.ok
        row["tokens"] += rec.tokens or 0
    return out


def samples(records: list, window: tuple[float, float]) -> dict[str, list[float]]:
    """TTFT, inter-token gaps and end-to-end latencies of the window's requests (for CDFs), in s."""
    w0, w1 = window
    ttft, itl, latency = [], [], []
    for rec in records:
        if not (rec.ok and w0 <= rec.start < w1):
            continue
        counts = tokens_per_chunk(rec.chunk_times, rec.tokens)
        if rec.ttft is not None:
            ttft.append(round(rec.ttft, 6))
        latency.append(round(rec.end - rec.start, 6))
        for j in range(1, len(rec.chunk_times)):
            itl.extend([round((rec.chunk_times[j] - rec.chunk_times[j - 1]) / counts[j], 6)] * counts[j])
    return {"ttft_s": ttft, "itl_s": itl, "latency_s": latency}


def counter_deltas(before_text: str | None, after_text: str | None) -> dict[str, float] | None:
    """Counters, and histograms' _sum and _count, that moved between the two scrapes."""
    if not before_text or not after_text:
        return None
    before, after = parse_metrics(before_text), parse_metrics(after_text)
    return {name: after[name] - before.get(name, 0.0) for name in sorted(after)
            if name.startswith(COUNTER_PREFIXES) and ("_total" in name or name.endswith(("_sum", "_count")))
            and after[name] != before.get(name, 0.0)}


def server_means(deltas: dict[str, float] | None) -> dict[str, float]:
    """Means over the run of the server's own latency histograms (loraplex's and vLLM's names):
    what tells a slower server apart from a client that measures differently."""
    out = {}
    for name in ("loraplex_time_to_first_token_seconds", "loraplex_inter_token_latency_seconds",
                 "loraplex_e2e_request_latency_seconds", "loraplex_engine_step_duration_seconds",
                 "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:time_per_output_token_seconds", "vllm:e2e_request_latency_seconds"):
        count = (deltas or {}).get(f"{name}_count")
        if count:
            out[name.split(":")[-1].removeprefix("loraplex_") + "_mean"] = deltas[f"{name}_sum"] / count
    return out


def build(records: list, window: tuple[float, float], slo: tuple[float | None, float | None]) -> dict:
    summary = summarize_requests(records, window)
    summary["slo"] = slo_attainment(records, window, *slo)
    summary["status"] = errors_by_status(records)
    summary["all_requests"] = {"sent": len(records), "ok": sum(rec.ok for rec in records),
                               "completion_tokens": sum(rec.tokens or 0 for rec in records if rec.ok)}
    summary["tenants"] = per_tenant(records)
    return summary


def format_summary(report: dict) -> str:
    def ms(stats: dict | None, key: str) -> str:
        return "-" if not stats else f"{stats[key] * 1e3:.1f}"

    lines = [f"requests: {report['all_requests']['sent']} sent, {report['all_requests']['ok']} ok; "
             f"status {report['status']}",
             f"throughput (window {report['window_s']:.1f} s): {report['output_tokens_per_s']:.1f} output tok/s, "
             f"{report['requests_per_s']:.2f} req/s"]
    for name, key in (("TTFT", "ttft_s"), ("ITL", "itl_s"), ("end-to-end", "latency_s")):
        stats = report[key]
        lines.append(f"{name:11s} ms  p50 {ms(stats, 'p50')}  p90 {ms(stats, 'p90')}  p99 {ms(stats, 'p99')}"
                     f"  ({stats['count'] if stats else 0} samples)")
    slo = report.get("slo")
    if slo and slo["attainment"] is not None:
        lines.append(f"SLO (TTFT <= {slo['ttft_s']} s, ITL <= {slo['itl_s']} s): {slo['met']}/{slo['requests']} "
                     f"= {slo['attainment']:.1%}")
    return "\n".join(lines)
