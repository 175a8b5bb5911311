"""Benchmark the Triton paged attention against the PyTorch gather + SDPA path on one GPU.

    PYTHONPATH=. python3 loadtest/bench_attention.py [--out DIR] [--only SUBSTRING] [--tune] [--dry-run]

One layer, bf16, pages of 16 keys shuffled over the cache, q a strided view of a fused qkv
tensor; Llama-2-7B (32 heads / 32 kv heads / 128) and Llama-3-8B (32 / 8 / 128) head shapes.
Scenarios: decode batches of B = 1, 16, 64, 256 sequences at context 192, B = 64 at 1024, B = 8
at 4096, and a prefill of 8 prompts x 512 tokens. Methods: ours (kernels/triton_attention.py;
where it splits the keys of a decode batch, `ours_nosplit_us` times it unsplit too) and the
PyTorch path that server/model/attention.py ran before this kernel, copied below so the
comparison holds while the server routes CUDA batches to the kernel: a decode batch gathers
every sequence's K/V padded to the longest context and runs one masked SDPA; otherwise each
sequence's K/V is gathered and attended on its own.

Times are medians of triton.testing.do_bench (L2 flushed before every run, so K/V come from
HBM; host launch time hides behind the flush). Bandwidth counts the bytes that must move:
every visible K/V element once, q read and out written; % copy is that over a measured
device-to-device copy (read + write). Results: a table on stdout and JSON
(`attention_bench_h200.json`) in --out (default $OUT, else loadtest/results). `--tune` instead
sweeps launch configurations on a few key cases, or on every case --only selects
(`attention_tune_h200.json`; a few minutes, mostly compiling); `--dry-run` runs
tiny shapes on the CPU interpreter to check the plumbing (timings there mean nothing;
`attention_bench_dry_run.json`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from loadtest.bench_lora_kernels import copy_bandwidth

MODELS = {"llama2-7b": (32, 32, 128), "llama3-8b": (32, 8, 128)}  # (heads, kv_heads, head_dim)
SCENARIOS = {  # name -> (sequences, context, query tokens per sequence)
    "decode-1x192": (1, 192, 1), "decode-16x192": (16, 192, 1), "decode-64x192": (64, 192, 1),
    "decode-256x192": (256, 192, 1), "decode-64x1024": (64, 1024, 1), "decode-8x4096": (8, 4096, 1),
    "prefill-8x512": (8, 512, 512),
}
TUNE_SCENARIOS = ("decode-64x1024", "decode-8x4096", "decode-256x192", "prefill-8x512")
PAGE = 16
DTYPE = torch.bfloat16


class Case:
    """One layer's inputs for a scenario: the kernel's int32 metadata and the baseline's host lists."""

    def __init__(self, model: str, scenario: str, device, seed=0, layout: str = "nhd"):
        heads, kv_heads, head_dim = MODELS[model]
        num_seqs, ctx, n = SCENARIOS[scenario]
        gen = torch.Generator(device=device).manual_seed(seed)
        pages_per_seq = -(-ctx // PAGE)
        num_blocks = num_seqs * pages_per_seq + 16
        shape = (num_blocks, PAGE, kv_heads, head_dim)
        self.k_cache = torch.randn(shape, generator=gen, device=device).to(DTYPE)
        self.v_cache = torch.randn(shape, generator=gen, device=device).to(DTYPE)
        if layout == "hnd":  # each head's page stored contiguously; the same logical (block, slot, head, dim) view
            self.k_cache = self.k_cache.transpose(1, 2).contiguous().transpose(1, 2)
            self.v_cache = self.v_cache.transpose(1, 2).contiguous().transpose(1, 2)
        physical = torch.randperm(num_blocks, generator=gen, device=device)[: num_seqs * pages_per_seq]
        self.tables_long = physical.view(num_seqs, pages_per_seq)  # (B, pages) int64, the baseline's
        self.block_tables = self.tables_long.int()
        self.starts = [i * n for i in range(num_seqs + 1)]
        self.lens = [ctx] * num_seqs
        self.query_starts = torch.tensor(self.starts, dtype=torch.int32, device=device)
        self.context_lens = torch.tensor(self.lens, dtype=torch.int32, device=device)
        self.lens_long = self.context_lens.long()
        num_tokens = num_seqs * n
        qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, generator=gen, device=device).to(DTYPE)
        self.q = qkv[:, : heads * head_dim].view(num_tokens, heads, head_dim)  # strided, as in the model
        self.q_dense = self.q.contiguous()
        self.max_query_len = n
        self.scale = head_dim**-0.5
        kv_bytes = 2 * num_seqs * ctx * kv_heads * head_dim * DTYPE.itemsize
        self.bytes = kv_bytes + 2 * self.q.numel() * DTYPE.itemsize  # K/V once, q read, out written
        self.flops = 4 * heads * head_dim * num_seqs * sum(ctx - n + j + 1 for j in range(n))  # QK^T and PV, causal

    def ours(self):
        from kernels.triton_attention import paged_attention

        return paged_attention(self.q, self.k_cache, self.v_cache, self.block_tables, self.query_starts,
                               self.context_lens, self.max_query_len, self.scale)

    def ours_with(self, config):
        from kernels.triton_attention import launch_paged_attention

        return launch_paged_attention(self.q, self.k_cache, self.v_cache, self.block_tables, self.query_starts,
                                      self.context_lens, self.max_query_len, self.scale, config=config)

    def torch_gather_sdpa(self):
        return torch_paged_attention(self.q_dense, self.k_cache, self.v_cache, self.tables_long, self.starts,
                                     self.lens, self.lens_long, self.scale)

    def config(self):
        from kernels.triton_attention import attention_config

        heads, kv_heads = self.q.shape[1], self.k_cache.shape[2]
        return attention_config(len(self.lens), self.max_query_len, kv_heads, heads // kv_heads, self.q.shape[2],
                                DTYPE, self.q.device)


def torch_paged_attention(q, k_cache, v_cache, tables, starts, lens, lens_tensor, scale):
    """The server's PyTorch path before the kernel (server/model/attention.py at commit 502b38d)."""
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    if starts[-1] == len(lens):  # decode: pad keys to the longest context and mask, one SDPA call
        max_len = max(lens)
        k = k_cache[tables[:, : -(-max_len // PAGE)]].flatten(1, 2)[:, :max_len]  # (B, L, kv_heads, head_dim)
        v = v_cache[tables[:, : -(-max_len // PAGE)]].flatten(1, 2)[:, :max_len]
        mask = torch.arange(max_len, device=q.device)[None, :] < lens_tensor[:, None]  # (B, L)
        out = F.scaled_dot_product_attention(
            q.view(len(lens), heads, 1, -1), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=heads != kv_heads,
        )  # (B, heads, 1, head_dim)
        return out.view(len(lens), heads, -1)
    out = torch.empty_like(q)
    for i, length in enumerate(lens):
        start, end = starts[i], starts[i + 1]
        pages = tables[i, : -(-length // PAGE)]
        k = k_cache.index_select(0, pages).flatten(0, 1)[:length]  # (L, kv_heads, head_dim)
        v = v_cache.index_select(0, pages).flatten(0, 1)[:length]
        q_pos = torch.arange(length - (end - start), length, device=q.device)
        mask = torch.arange(length, device=q.device)[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(q[start:end].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=mask[None], scale=scale, enable_gqa=heads != kv_heads)
        out[start:end] = o.transpose(0, 1)
    return out


def median_us(fn) -> float:
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":  # --dry-run: wall clock
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3


def bench_case(model, scenario, device, copy_bw, layout="nhd") -> dict:
    import kernels.triton_attention as triton_attention

    case = Case(model, scenario, device, layout=layout)
    cfg = case.config()
    ours, ref = case.ours(), case.torch_gather_sdpa()
    diff = float((ours.float() - ref.float()).abs().max())
    row = dict(model=model, scenario=scenario, num_seqs=len(case.lens), context=case.lens[0],
               tokens=case.q.shape[0], bytes=case.bytes, config=cfg, max_abs_diff=diff, ok=diff < 3e-2)
    row["ours_us"] = median_us(case.ours)
    row["torch_us"] = median_us(case.torch_gather_sdpa)
    if cfg["NUM_SPLITS"] > 1:
        triton_attention.SPLIT_KV = False
        try:
            row["ours_nosplit_us"] = median_us(case.ours)
        finally:
            triton_attention.SPLIT_KV = True
    row["ours_GBps"] = case.bytes / (row["ours_us"] * 1e-6) / 1e9
    row["ours_frac_copy"] = case.bytes / (row["ours_us"] * 1e-6) / copy_bw
    row["ours_TFLOPs"] = case.flops / (row["ours_us"] * 1e-6) / 1e12
    row["speedup_vs_torch"] = row["torch_us"] / row["ours_us"]
    return row


def tune_candidates(case: Case) -> list[dict]:
    heads, kv_heads = case.q.shape[1], case.k_cache.shape[2]
    group = heads // kv_heads
    base = case.config()
    if case.max_query_len == 1:
        splits = sorted({1, base["NUM_SPLITS"], 2 * base["NUM_SPLITS"]}) if base["NUM_SPLITS"] > 1 else [1]
        shapes = list(itertools.product((16, 32, 64, 128), (2, 4, 8), (2, 3, 4)))
        return [dict(base, BLOCK_N=bn, num_warps=w, num_stages=st, NUM_SPLITS=sp)
                for (bn, w, st), sp in itertools.product(shapes, splits)]
    return [dict(base, BLOCK_M=bm, TILE_Q=bm // group, BLOCK_N=bn, num_warps=w, num_stages=st)
            for bm, bn, w, st in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))]


def tune(args, device) -> int:
    report = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
                  method="median of triton.testing.do_bench", cases=[])
    for model, scenario in itertools.product(MODELS, SCENARIOS if args.only else TUNE_SCENARIOS):
        if args.only and args.only not in f"{model}/{scenario}":
            continue
        case = Case(model, scenario, device, layout=args.layout)
        default = case.config()
        want = case.torch_gather_sdpa().float()
        results = []
        for cfg in tune_candidates(case):
            try:
                ok = float((case.ours_with(cfg).float() - want).abs().max()) < 3e-2
                results.append(dict(config=cfg, us=median_us(lambda: case.ours_with(cfg)), ok=ok))
            except Exception as err:  # out of shared memory or registers: recorded, not fatal
                results.append(dict(config=cfg, error=f"{type(err).__name__}: {str(err)[:120]}"))
        timed = sorted((r for r in results if "us" in r and r["ok"]), key=lambda r: r["us"])
        default_us = next((r["us"] for r in results if r["config"] == default), None) or median_us(case.ours)
        report["cases"].append(dict(model=model, scenario=scenario, default=default, default_us=default_us,
                                    best=timed[:5], all=results))
        best = timed[0] if timed else {}
        print(f"{model:10} {scenario:15} default {default_us:8.1f} us  best {best.get('us', float('nan')):8.1f} us "
              f"{best.get('config')}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.layout == "nhd" else f"_{args.layout}"
    path = out / ("attention_tune_dry_run.json" if args.dry_run else f"attention_tune{suffix}_h200.json")
    path.write_text(json.dumps(report, indent=1))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "loadtest/results")
    parser.add_argument("--only", default="", help="run only cases whose 'model/scenario' contains this")
    parser.add_argument("--tune", action="store_true", help="sweep launch configurations on key cases instead")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU interpreter")
    parser.add_argument("--layout", default="nhd", choices=["nhd", "hnd"],
                        help="KV cache storage: pages of (slot, head, dim) (the server's) or (head, slot, dim)")
    args = parser.parse_args(argv)
    global MODELS, SCENARIOS, TUNE_SCENARIOS
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        MODELS = {"llama2-7b": (2, 2, 16), "llama3-8b": (4, 1, 32)}
        SCENARIOS = {"decode-1x40": (1, 40, 1), "decode-3x20": (3, 20, 1), "prefill-2x24": (2, 24, 24)}
        TUNE_SCENARIOS = tuple(SCENARIOS)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if args.tune:
        return tune(args, device)
    import triton

    started = time.perf_counter()
    copy_bw = copy_bandwidth(device)
    report = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
                  torch=torch.__version__, triton=triton.__version__, copy_bandwidth_GBps=copy_bw / 1e9,
                  dtype=str(DTYPE), page=PAGE,
                  method="median of triton.testing.do_bench (L2 flushed before each run); bytes = K/V once + q + out",
                  cases=[])
    print(f"device copy bandwidth: {copy_bw / 1e9:.0f} GB/s (read + write)", flush=True)
    print(f"{'model':10} {'scenario':15} {'ours us':>8} {'GB/s':>6} {'%copy':>6} {'TFLOP/s':>7} {'torch us':>9} "
          f"{'speedup':>7} {'nosplit us':>10}  splits ok", flush=True)
    for model, scenario in itertools.product(MODELS, SCENARIOS):
        if args.only and args.only not in f"{model}/{scenario}":
            continue
        row = bench_case(model, scenario, device, copy_bw, args.layout)
        report["cases"].append(row)
        nosplit = f"{row['ours_nosplit_us']:10.1f}" if "ours_nosplit_us" in row else " " * 10
        print(f"{model:10} {scenario:15} {row['ours_us']:8.1f} {row['ours_GBps']:6.0f} "
              f"{100 * row['ours_frac_copy']:5.1f}% {row['ours_TFLOPs']:7.1f} {row['torch_us']:9.1f} "
              f"{row['speedup_vs_torch']:6.1f}x {nosplit}  {row['config']['NUM_SPLITS']:6} "
              f"{'ok' if row['ok'] else 'DIFF %.3g' % row['max_abs_diff']}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["wall_s"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.layout == "nhd" else f"_{args.layout}"
    path = out / ("attention_bench_dry_run.json" if args.dry_run else f"attention_bench{suffix}_h200.json")
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path} in {report['wall_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
