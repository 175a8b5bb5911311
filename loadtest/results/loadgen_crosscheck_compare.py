"""Issue 11 cross-check: aiperf's and `python -m loadtest run`'s figures for one workload, side by side.

    PYTHONPATH=. python loadtest/results/loadgen_crosscheck_compare.py --duration 40 \
        --run NAME=aiperf:SUMMARY.json:RECORDS.jsonl ... --run NAME=ours:REPORT.json ... \
        [--server NAME=BEFORE.metrics:AFTER.metrics ...] --out TABLE.json

An aiperf run gives aiperf's own figures (its profile_export_aiperf.json) and ours re-derived from
aiperf's per-request records (its profile_export.jsonl, or the trimmed *_records.jsonl committed
here: request start and end, TTFT, each inter-chunk gap, the usage's completion tokens, the model)
by loadtest/run_report.build over [first request, first request + duration): the same requests
under both sets of definitions. --server takes two /metrics scrapes taken around a stretch of
runs and reports what the server itself saw in between (means of its TTFT, inter-token latency
and engine-step histograms): how fast the server ran while each client drove it.
"""
import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from loadtest import run_report
from loadtest.serving_report import parse_metrics
from loadtest.sse_client import RequestRecord

COMPLETIONS = 'loraplex_http_requests_total{endpoint="/v1/completions"}'


def aiperf_records(path: Path) -> list[RequestRecord]:
    """aiperf's per-request records as the generator's RequestRecords (times in s, one clock)."""
    records = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        meta, m = row["metadata"], row.get("metrics") or {}
        start = meta["request_start_ns"] / 1e9
        rec = RequestRecord(start=start, end=meta["request_end_ns"] / 1e9, status=200, tenant=meta.get("model"))
        if row.get("error") or meta.get("was_cancelled"):
            rec.error = "error" if row.get("error") else "cancelled"
        if "time_to_first_token" in m:
            t = start + m["time_to_first_token"]["value"] / 1e3
            rec.chunk_times.append(t)
            for gap in m.get("inter_chunk_latency", {}).get("value", []):
                t += gap / 1e3
                rec.chunk_times.append(t)
        rec.tokens = (m.get("usage_completion_tokens") or m.get("output_token_count") or {}).get("value")
        records.append(rec)
    return records


def aiperf_tenants(records: list[RequestRecord]) -> dict[str, int] | None:
    counts = Counter(rec.tenant for rec in records)
    return dict(sorted(counts.items())) if len(counts) > 1 else None


def server_side(before: str, after: str) -> dict:
    a, b = parse_metrics(Path(before).read_text()), parse_metrics(Path(after).read_text())
    d = lambda k: b.get(k, 0.0) - a.get(k, 0.0)
    mean = lambda k: round(1e3 * d(k + "_sum") / d(k + "_count"), 1) if d(k + "_count") else None
    return {"completions": d(COMPLETIONS), "generation_tokens": d("loraplex_generation_tokens_total"),
            "ttft_mean_ms": mean("loraplex_time_to_first_token_seconds"),
            "itl_mean_ms": mean("loraplex_inter_token_latency_seconds"),
            "engine_step_mean_ms": mean("loraplex_engine_step_duration_seconds")}


def p(stats: dict | None, scale: float = 1e3) -> list | None:
    return None if not stats else [round(stats["p50"] * scale, 1), round(stats["p90"] * scale, 1)]


def ours_row(summary: dict) -> dict:
    return {"requests_ok": summary["all_requests"]["ok"], "requests_sent_in_window": summary["requests"]["measured"],
            "output_tok_s": round(summary["output_tokens_per_s"], 2),
            "ttft_ms_p50_p90": p(summary["ttft_s"]), "itl_each_gap_ms_p50_p90": p(summary["itl_s"]),
            "tpot_per_request_ms_p50_p90": p(summary["tpot_s"]), "e2e_ms_p50_p90": p(summary["latency_s"])}


def aiperf_own(s: dict) -> dict:
    g = lambda k, f: s[k][f] if s.get(k) else None
    pair = lambda k: [round(g(k, "p50"), 1), round(g(k, "p90"), 1)] if s.get(k) else None
    return {"requests": g("request_count", "avg"), "output_tok_s": round(g("output_token_throughput", "avg"), 2),
            "benchmark_duration_s": round(g("benchmark_duration", "avg"), 2),
            "ttft_ms_p50_p90": pair("time_to_first_token"),
            "itl_ms_p50_p90 (per-request mean after the first token)": pair("inter_token_latency"),
            "icl_ms_p50_p90 (each chunk gap)": pair("inter_chunk_latency"),
            "e2e_ms_p50_p90": pair("request_latency")}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, required=True, help="the runs' sending time, s")
    ap.add_argument("--run", nargs="+", required=True)
    ap.add_argument("--server", nargs="*", default=[])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = {}
    for spec in args.run:
        name, _, rest = spec.partition("=")
        tool, path, *more = rest.split(":")
        if tool == "aiperf":
            records = aiperf_records(Path(more[0]))
            w0 = min(r.start for r in records)
            row = {"tool": "aiperf", "own": aiperf_own(json.loads(Path(path).read_text())),
                   "by_our_definitions": ours_row(run_report.build(records, (w0, w0 + args.duration), (None, None))),
                   "tenants": aiperf_tenants(records)}
        else:
            report = json.loads(Path(path).read_text())
            tenants = report["summary"]["tenants"]
            row = {"tool": "python -m loadtest run", "own": ours_row(report["summary"]),
                   "tenants": {t: v["requests"] for t, v in sorted(tenants.items())} if len(tenants) > 1 else None}
        rows[name] = row
    for spec in args.server:
        name, _, scrapes = spec.partition("=")
        rows.setdefault("server_side", {})[name] = server_side(*scrapes.split(":"))
    text = json.dumps(rows, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
