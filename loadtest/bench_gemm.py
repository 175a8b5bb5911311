"""How fast the shared `x W^T` of each projection runs at serving batch sizes, by weight layout (GPU).

    PYTHONPATH=. python3 loadtest/bench_gemm.py [--out DIR] [--rows 64,192]

A decode step is mostly the projections' GEMMs, and at 64 rows they are bound by reading the
weights: the question is how close each shape gets to the copy bandwidth, and whether the
layout cuBLAS is handed changes its choice of kernel. For the Llama-2-7B and Llama-3-8B
projections (fused qkv, o, fused gate/up, down, LM head) and each row count, three ways:

- `linear`: F.linear(x, W), W (out, in) row-major: what the model runs today;
- `mm_t`: x @ Wt with Wt (in, out) contiguous, a transposed copy made once;
- `linear_lt`: F.linear with torch's preferred BLAS library set to cuBLASLt.

Each is timed as a CUDA graph of 16 calls cycling over 4 distinct weight copies (so the weights
come from HBM, as in the model, not from L2), median of 20 replays. Writes gemm_bench_h200.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from loadtest.bench_lora_kernels import copy_bandwidth

SHAPES = {  # name -> (in_features, out_features)
    "llama2-7b": {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096),
                  "lm_head": (4096, 32000)},
    "llama3-8b": {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096),
                  "lm_head": (4096, 128256)},
}
COPIES, CALLS, REPLAYS = 4, 16, 20


def time_graph(fn, device) -> float:
    """Seconds per call: CALLS calls captured in one graph, median over REPLAYS replays."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            fn(i)
    times = []
    for _ in range(REPLAYS + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / CALLS)
    return statistics.median(times[3:])


def bench_shape(k: int, n: int, rows: list[int], device, copy_bw: float) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(k * 7 + n)
    weights = [torch.randn(n, k, generator=gen, device=device, dtype=torch.bfloat16) / k**0.5 for _ in range(COPIES)]
    transposed = [w.t().contiguous() for w in weights]
    out = []
    for m in rows:
        x = torch.randn(m, k, generator=gen, device=device, dtype=torch.bfloat16)
        ref = F.linear(x, weights[0]).float()
        assert (x @ transposed[0]).float().sub(ref).abs().max() < 0.05 * ref.abs().max()
        row = dict(rows=m, weight_bytes=n * k * 2)
        row["linear_us"] = time_graph(lambda i: F.linear(x, weights[i % COPIES]), device) * 1e6
        row["mm_t_us"] = time_graph(lambda i: torch.mm(x, transposed[i % COPIES]), device) * 1e6
        previous = torch.backends.cuda.preferred_blas_library()
        try:
            torch.backends.cuda.preferred_blas_library("cublaslt")
            row["linear_lt_us"] = time_graph(lambda i: F.linear(x, weights[i % COPIES]), device) * 1e6
        except RuntimeError as err:
            row["linear_lt_error"] = str(err)[:200]
        finally:
            torch.backends.cuda.preferred_blas_library(previous)
        for method in ("linear", "mm_t", "linear_lt"):
            if f"{method}_us" in row:
                row[f"{method}_frac_copy"] = (n * k * 2 + m * (k + n) * 2) / (row[f"{method}_us"] * 1e-6) / copy_bw
        out.append(row)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "loadtest/results")
    parser.add_argument("--rows", default="16,64,128,192,256")
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    rows = [int(r) for r in args.rows.split(",")]
    copy_bw = copy_bandwidth(device)
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, copy_bandwidth_GBps=copy_bw / 1e9,
                  method=f"CUDA graph of {CALLS} calls over {COPIES} weight copies, median of {REPLAYS} replays; "
                         "% copy = (W + x + y bytes) / time / copy bandwidth", shapes=[])
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    print(f"{'model':10} {'proj':8} {'rows':>5} {'linear us':>10} {'%':>5} {'mm_t us':>8} {'%':>5} {'lt us':>8} {'%':>5}")
    for model, shapes in SHAPES.items():
        for name, (k, n) in shapes.items():
            measured = bench_shape(k, n, rows, device, copy_bw)
            torch.cuda.empty_cache()  # the shape's weight copies, freed on return
            for row in measured:
                report["shapes"].append(dict(model=model, proj=name, in_features=k, out_features=n, **row))
                lt = row.get("linear_lt_us", float("nan"))
                print(f"{model:10} {name:8} {row['rows']:5} {row['linear_us']:10.1f} "
                      f"{100 * row['linear_frac_copy']:5.1f} {row['mm_t_us']:8.1f} {100 * row['mm_t_frac_copy']:5.1f} "
                      f"{lt:8.1f} {100 * row.get('linear_lt_frac_copy', float('nan')):5.1f}", flush=True)
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "gemm_bench_h200.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
