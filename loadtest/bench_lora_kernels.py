"""Benchmark the Triton LoRA shrink+expand pair against two PyTorch baselines on one GPU.

    python3 loadtest/bench_lora_kernels.py [--out DIR] [--only SUBSTRING] [--tune [--tune-kinds K]] [--dry-run]
                                           [--no-pdl] [--compare-no-pdl] [--compare-tiles16] [--compare-pair]

Measures the device copy bandwidth, then for Llama-3-8B shapes (a 4096 -> 4096 projection,
and the fused q/k/v 4096 -> 4096/1024/1024), ranks 8, 16, 64 and a mixed pool (ranks 8/16/64
by slot, max_rank 64), times: decode with T = 1, 16, 64, 256 tokens each on its own adapter,
decode with 256 tokens over Zipf-shared adapters, and prefill of 8 sequences x 512 tokens over
8 adapters. Methods: ours (the Triton `lora_apply` of kernels/triton_fused_decode.py: the
shrink/expand pair, or one launch for distinct decode over 64 tokens; `--compare-pair` also
times the pair there), (a) gather the adapters' weights per token then torch.bmm, (b) a loop of per-adapter cuBLAS matmuls (rank-exact
slices, contiguous segments as views, host-side scales: its best case).

Every figure is the median over replays of a CUDA graph holding several shrink+expand pairs,
each pair on its own adapters and activations, so that a replay touches far more than the
50 MB L2 and is not served from it; the per-pair time is the replay time over the count.
Effective bandwidth counts the bytes that must be touched: x, each distinct adapter's A and B
once at its true rank, and y read and written. Results: a table on stdout and JSON
(`kernel_bench_h200.json`) in --out, default loadtest/results. `--dry-run` runs tiny shapes on
the CPU under the Triton interpreter to check the plumbing (timings there mean nothing).
The kernels use programmatic dependent launch where the GPU and triton allow (see
kernels/triton_shrink.py); `--no-pdl` turns it off, and `--compare-no-pdl` also times our pair
without it in the same run (`ours_nopdl_us`, `ours_nopdl_shrink_us`, `ours_nopdl_expand_us`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

PROJECTIONS = {"o": (4096, (4096,)), "qkv": (4096, (4096, 1024, 1024))}
RANKS = (8, 16, 64, "mixed")
MIXED_CYCLE = (8, 16, 64)  # slot s of the mixed pool has rank MIXED_CYCLE[s % 3]
SCENARIOS = ("decode-distinct-1", "decode-distinct-16", "decode-distinct-64", "decode-distinct-256",
             "decode-zipf-256", "prefill-8x512")
NUM_SLOTS = 1024
ROTATE_BYTES = 256 << 20  # a graph replay touches at least this much (5x the L2) where slots allow
MAX_PAIRS = 48
DTYPE = torch.bfloat16


class Pool:
    """One projection's slot pool, B stored rank-major (see kernels/triton_expand.py)."""

    def __init__(self, h_in, widths, rank, num_slots, device):
        self.h_in, self.widths = h_in, widths
        self.max_rank = 64 if rank == "mixed" else rank
        self.rank_of = [MIXED_CYCLE[s % 3] if rank == "mixed" else rank for s in range(num_slots)]
        r = torch.tensor(self.rank_of, device=device)
        self.slot_ranks = r[:, None].repeat(1, len(widths)).to(torch.int32)
        keep = torch.arange(self.max_rank, device=device)[None, :] < r[:, None]  # (S, R)
        self.a, self.b = [], []
        for h_out in widths:
            a = torch.randn(num_slots, self.max_rank, h_in, device=device) * h_in**-0.5
            self.a.append(torch.where(keep[:, :, None], a, 0.0).to(DTYPE))
            b = torch.randn(num_slots, self.max_rank, h_out, device=device) * self.max_rank**-0.5
            self.b.append(torch.where(keep[:, :, None], b, 0.0).to(DTYPE).transpose(1, 2))
        self.scales = torch.rand(num_slots, len(widths), device=device) + 0.5
        self.scales_host = self.scales.tolist()

    def adapter_bytes(self, slot: int) -> int:
        return self.rank_of[slot] * sum(self.h_in + h for h in self.widths) * DTYPE.itemsize


def scenario_slots(name: str, pair: int, gen: random.Random) -> list[int]:
    """Token slots of one pair; pairs use disjoint slots (mod the pool) so none hits L2."""
    if name.startswith("decode-distinct"):
        n = int(name.rsplit("-", 1)[1])
        return [(pair * n + i) % NUM_SLOTS for i in range(n)]
    if name == "decode-zipf-256":  # 256 tokens over 128 adapters, Zipf(1.0) popularity
        weights = [1.0 / k for k in range(1, 129)]
        return [(pair * 128 + s) % NUM_SLOTS for s in gen.choices(range(128), weights, k=256)]
    if name == "prefill-8x512":
        return [(pair * 8 + j) % NUM_SLOTS for j in range(8) for _ in range(512)]
    raise ValueError(name)


def must_touch_bytes(pool: Pool, slots: list[int]) -> int:
    num_tokens = len(slots)
    activations = num_tokens * pool.h_in + 2 * num_tokens * sum(pool.widths)  # x, then y read + written
    return activations * DTYPE.itemsize + sum(pool.adapter_bytes(s) for s in set(slots))


@dataclass
class Pair:
    """One shrink+expand's inputs, and the host-side views the baselines want."""

    x: torch.Tensor  # (T, h_in)
    y: torch.Tensor  # (T, sum of widths)
    v: torch.Tensor  # (n_slices, T, max_rank) fp32
    meta: object  # LoRABatchMeta
    idx: torch.Tensor  # (T,) int64 slot per token, for the gather baseline
    scale: torch.Tensor  # (T, n_slices) fp32, likewise
    groups: list  # (slot, token indices, slice of contiguous tokens or None), for the loop


# --- the three methods: each runs one pair ------------------------------------------------------

def ours(pool, shrink_cfg=None, expand_cfg=None, parts=("shrink", "expand")):
    """Our LoRA op as the model calls it (`parts` both, no configurations: one-launch decode kernel
    or the pair, by the rule of kernels/triton_fused_decode.py), or the pair's kernels alone."""
    from kernels.triton_expand import lora_expand
    from kernels.triton_fused_decode import lora_apply
    from kernels.triton_shrink import lora_shrink

    def run(p: Pair, y: torch.Tensor):
        if len(parts) == 2 and shrink_cfg is None and expand_cfg is None:
            lora_apply(y, p.x, pool.a, pool.b, pool.scales, p.meta, slot_ranks=pool.slot_ranks)
            return
        if "shrink" in parts:
            lora_shrink(p.x, pool.a, p.meta, p.v, slot_ranks=pool.slot_ranks, config=shrink_cfg)
        if "expand" in parts:
            lora_expand(y, p.v, pool.b, pool.scales, p.meta, slot_ranks=pool.slot_ranks, config=expand_cfg)
    return run


def fused_decode(pool, cfg):
    """The one-launch decode kernel under a given configuration (--tune)."""
    from kernels.triton_fused_decode import lora_fused_decode

    def run(p: Pair, y: torch.Tensor):
        lora_fused_decode(y, p.x, pool.a, pool.b, pool.scales, p.meta, slot_ranks=pool.slot_ranks, config=cfg)
    return run


def gather_bmm(pool):
    """(a): gather every token's A and B (padded to max_rank), then batched matmuls."""
    def run(p: Pair, y: torch.Tensor):
        offset = 0
        for i, h_out in enumerate(pool.widths):
            vi = torch.bmm(pool.a[i].index_select(0, p.idx), p.x.unsqueeze(2))  # (T, R, 1)
            delta = torch.bmm(pool.b[i].index_select(0, p.idx), vi).squeeze(2)  # (T, h_out)
            y[:, offset : offset + h_out].add_(delta * p.scale[:, i : i + 1])
            offset += h_out
    return run


def loop_matmuls(pool):
    """(b): per adapter, x_seg @ A^T then y_seg += scale * v @ B^T, with cuBLAS."""
    def run(p: Pair, y: torch.Tensor):
        for slot, idx, segment in p.groups:
            xs = p.x[segment] if segment is not None else p.x.index_select(0, idx)
            r, offset = pool.rank_of[slot], 0
            for i, h_out in enumerate(pool.widths):
                vi = xs @ pool.a[i][slot, :r].t()  # (n, r)
                b = pool.b[i][slot, :, :r]  # (h_out, r), a view of rank-major storage
                scale = pool.scales_host[slot][i]
                if segment is not None:
                    y[segment, offset : offset + h_out].addmm_(vi, b.t(), alpha=scale)
                else:
                    y[:, offset : offset + h_out].index_add_(0, idx, vi @ b.t(), alpha=scale)
                offset += h_out
    return run


def make_pairs(pool, name, num_pairs, device, seed=0) -> list[Pair]:
    from kernels.metadata import LoRABatchMeta

    gen = random.Random(seed)
    pairs = []
    for p in range(num_pairs):
        slots = scenario_slots(name, p, gen)
        positions: dict[int, list[int]] = {}
        for t, s in enumerate(slots):
            positions.setdefault(s, []).append(t)
        groups = []
        for s, pos in sorted(positions.items()):
            contiguous = pos == list(range(pos[0], pos[0] + len(pos)))
            groups.append((s, torch.tensor(pos, device=device), slice(pos[0], pos[-1] + 1) if contiguous else None))
        idx = torch.tensor(slots, device=device)
        pairs.append(Pair(
            x=torch.randn(len(slots), pool.h_in, device=device).to(DTYPE),
            y=torch.randn(len(slots), sum(pool.widths), device=device).to(DTYPE),
            v=torch.empty(len(pool.widths), len(slots), pool.max_rank, device=device),
            meta=LoRABatchMeta.build(slots, device), idx=idx, scale=pool.scales.index_select(0, idx), groups=groups,
        ))
    return pairs


def time_pairs(fn, pairs, iters=20) -> float:
    """Median microseconds per pair over replays of a CUDA graph of all the pairs."""
    if pairs[0].x.device.type != "cuda":  # --dry-run: plain wall clock, for plumbing only
        t0 = time.perf_counter()
        for pair in pairs:
            fn(pair, pair.y)
        return (time.perf_counter() - t0) * 1e6 / len(pairs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        for pair in pairs:
            fn(pair, pair.y)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for pair in pairs:
            fn(pair, pair.y)
    for _ in range(3):
        graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    del graph
    return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3 / len(pairs)


def copy_bandwidth(device) -> float:
    """Bytes read plus written per second by a large device-to-device copy."""
    if device.type != "cuda":
        return float("nan")
    src = torch.randn(1 << 30, device=device, dtype=DTYPE)  # 2 GiB
    dst = torch.empty_like(src)
    times = []
    for i in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 5:
            times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.nbytes / statistics.median(times)


def same_result(pairs, methods) -> bool:
    """Every method adds the same delta to y (bf16 tolerance), from the same starting y."""
    pair = pairs[0]
    outs = []
    for fn in methods:
        y = pair.y.clone()
        fn(pair, y)
        outs.append(y.float() - pair.y.float())
    ref = outs[0]
    scale = ref.abs().max().clamp(min=1e-3)
    return all(float((o - ref).abs().max() / scale) < 3e-2 for o in outs[1:])


def pairs_for(pool, name, device) -> tuple[list[Pair], list[int], int]:
    """Enough pairs that a replay misses L2 (as far as the slots allow); one pair's slots and bytes."""
    probe = scenario_slots(name, 0, random.Random(0))
    nbytes = must_touch_bytes(pool, probe)
    num_pairs = max(1, min(MAX_PAIRS, math.ceil(ROTATE_BYTES / nbytes), NUM_SLOTS // len(set(probe))))
    return make_pairs(pool, name, num_pairs if device.type == "cuda" else 1, device), probe, nbytes


def with_flag(fn, name: str, value: bool, module: str = "kernels.triton_shrink"):
    """fn with `module`'s switch `name` set to `value` while it runs (and is captured)."""
    import importlib

    switches = importlib.import_module(module)

    def run(p: Pair, y: torch.Tensor):
        saved = getattr(switches, name)
        setattr(switches, name, value)
        try:
            fn(p, y)
        finally:
            setattr(switches, name, saved)
    return run


def without_pdl(fn):
    """fn with programmatic dependent launch off while it runs (and while it is captured)."""
    return with_flag(fn, "PDL_ENABLED", False)


def bench_case(proj, rank, name, device, copy_bw, pool, compare_no_pdl=False, compare_tiles16=False,
               compare_pair=False):
    pairs, probe, nbytes = pairs_for(pool, name, device)
    methods = {"ours": ours(pool), "gather_bmm": gather_bmm(pool), "loop_matmul": loop_matmuls(pool)}
    row = dict(proj=proj, rank=rank, scenario=name, tokens=len(probe), adapters=len(set(probe)), pairs=len(pairs),
               bytes=nbytes, agree=same_result(pairs, list(methods.values())))
    for label, fn in methods.items():
        # the baselines' graphs get long (one matmul per adapter): fewer pairs keep capture quick
        use = pairs if label == "ours" else pairs[: max(1, min(len(pairs), 4))]
        us = time_pairs(fn, use)
        row[f"{label}_us"] = us
        row[f"{label}_frac_copy"] = nbytes / (us * 1e-6) / copy_bw
    row["ours_shrink_us"] = time_pairs(ours(pool, parts=("shrink",)), pairs)
    row["ours_expand_us"] = time_pairs(ours(pool, parts=("expand",)), pairs)
    row["ours_GBps"] = nbytes / (row["ours_us"] * 1e-6) / 1e9
    if compare_tiles16 and not name.startswith("prefill"):  # the shrink on 16-token tl.dot tiles instead
        row["ours_tiles16_us"] = time_pairs(with_flag(ours(pool), "GEMV_DECODE", False), pairs)
    if compare_pair and not name.startswith("prefill"):  # the shrink/expand pair instead of one launch
        row["ours_pair_us"] = time_pairs(with_flag(ours(pool), "FUSED_DECODE", False, "kernels.triton_fused_decode"),
                                         pairs)
    if compare_no_pdl:
        for key, parts in (("", ("shrink", "expand")), ("_shrink", ("shrink",)), ("_expand", ("expand",))):
            row[f"ours_nopdl{key}_us"] = time_pairs(without_pdl(ours(pool, parts=parts)), pairs)
    return row


TUNE_CASES = [("o", 8, "decode-distinct-256"), ("o", 16, "decode-distinct-64"), ("qkv", 16, "decode-distinct-256"),
              ("o", "mixed", "decode-distinct-64"), ("o", 8, "decode-distinct-64"), ("qkv", 8, "decode-distinct-64"),
              ("o", 64, "decode-distinct-256"), ("o", 16, "decode-distinct-256"), ("o", "mixed", "decode-distinct-256"),
              ("qkv", 8, "decode-distinct-256"), ("qkv", "mixed", "decode-distinct-256")]


def fused_candidates(pool, pairs) -> list[dict]:
    """One-launch decode configurations around the default one."""
    from kernels.triton_fused_decode import fused_decode_config

    p = pairs[0]
    base = fused_decode_config(p.x.shape[0], len(pool.widths), pool.max_rank, pool.h_in, p.meta, p.x.device)
    cands = [dict(base, SPLIT_K=split, BLOCK_N=n, num_warps=w) for split in (2, 4, 8)
             for n, w in ((512, 2), (1024, 2), (512, 1), (1024, 4))]
    cands += [dict(base, BLOCK_K=512, SPLIT_K=4), dict(base, BLOCK_K=128), dict(base, BLOCK_N=256, num_warps=1)]
    return [c for c in cands if c != base]


def tune_configs(pool, pairs, kinds=("shrink", "expand", "fused")):
    """Each kernel alone under candidate configurations: median us per pair, best first."""
    prefill = pairs[0].meta.max_group_tokens >= 64
    r_pad = min(64, max(16, 1 << (pool.max_rank - 1).bit_length()))
    if prefill:
        shrink = [dict(BLOCK_T=64, BLOCK_R=r_pad, BLOCK_K=bk, SPLIT_K=sk, num_warps=4, num_stages=st)
                  for bk, st, sk in ((128, 3, 1), (128, 3, 2), (128, 3, 4), (64, 4, 2), (64, 4, 4))]
        expand = [dict(BLOCK_T=bt, BLOCK_N=bn, N_SUB=ns, BLOCK_R=r_pad, num_warps=w, num_stages=1)
                  for bt, bn, ns, w in ((16, 128, 8, 4), (16, 128, 4, 4), (16, 256, 4, 4), (16, 64, 8, 2),
                                        (64, 128, 4, 8), (64, 64, 8, 4), (16, 128, 16, 4))]
    else:  # the shrink's one-token (GEMV) tiles; the expand keeps 16-token tl.dot tiles
        r_gemv = 8 if pool.max_rank <= 8 else 16
        shrink = [dict(BLOCK_T=1, BLOCK_R=r_gemv, BLOCK_K=bk, SPLIT_K=sk, num_warps=w, num_stages=1)
                  for bk, w in ((256, 4), (512, 4), (1024, 4), (512, 8)) for sk in (1, 2, 4, 8)]
        expand = [dict(BLOCK_T=16, BLOCK_N=bn, N_SUB=ns, BLOCK_R=r_pad, num_warps=w, num_stages=1)
                  for bn, ns, w in ((256, 1, 4), (128, 2, 4), (256, 2, 4), (128, 4, 4), (512, 1, 4), (256, 4, 8),
                                    (64, 4, 2))]
    p = pairs[0]
    y_start = p.y.clone()  # timing runs keep adding to p.y; checks start from this copy

    def output(fn):  # what one run leaves: v for shrink, y's change for expand
        y = y_start.clone()
        fn(p, y)
        return p.v.clone(), y.float() - y_start.float()

    fused = [] if prefill else fused_candidates(pool, pairs)
    expected = output(ours(pool, shrink_cfg={}, expand_cfg={}))  # the pair with its default configurations
    results = [dict(kernel=kind, config="default", us=time_pairs(ours(pool, parts=(kind,)), pairs), ok=True)
               for kind in ("shrink", "expand") if kind in kinds]
    if fused and "fused" in kinds:
        results.append(dict(kernel="fused", config="default", us=time_pairs(fused_decode(pool, None), pairs), ok=True))
        results.append(dict(kernel="fused", config="pair", us=time_pairs(ours(pool, {}, {}), pairs), ok=True))
    for kind, cands in (("shrink", shrink), ("expand", expand), ("fused", fused)):
        if kind not in kinds:
            continue
        for cfg in cands:
            if kind == "fused":  # checked on y only: the one launch leaves no v behind
                checked, timed, compare = fused_decode(pool, cfg), fused_decode(pool, cfg), slice(1, 2)
            else:
                kw = {"shrink_cfg": cfg} if kind == "shrink" else {"expand_cfg": cfg}
                checked, timed, compare = ours(pool, **kw), ours(pool, parts=(kind,), **kw), slice(0, 2)
            try:
                got = output(checked)
                ok = all(float((g - e).abs().max()) <= 3e-2 * float(e.abs().max())
                         for g, e in zip(got[compare], expected[compare]))
                us = time_pairs(timed, pairs)
            except Exception as exc:  # a configuration the compiler refuses is a result too
                ok, us = False, float("inf")
                print(f"      {kind} {cfg}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            results.append(dict(kernel=kind, config=cfg, us=us, ok=ok))
    results.sort(key=lambda r: (r["kernel"], r["us"]))
    return results


def tune(args, device) -> int:
    """--tune: the configuration sweep on the key cases, no baselines; JSON kernel_tune_h200.json."""
    report = []
    for proj, rank, name in TUNE_CASES:
        if args.only and not any(part in f"{proj}/{rank}/{name}" for part in args.only.split(",")):
            continue
        pool = Pool(*PROJECTIONS[proj], rank, NUM_SLOTS, device)
        pairs = pairs_for(pool, name, device)[0]
        results = tune_configs(pool, pairs, args.tune_kinds.split(","))
        report.append(dict(proj=proj, rank=rank, scenario=name, results=results))
        for kind in ("shrink", "expand", "fused"):
            rows = [r for r in results if r["kernel"] == kind]
            if not rows:
                continue
            default = next(r["us"] for r in rows if r["config"] == "default")
            print(f"{proj}/{rank}/{name} {kind}: default {default:.1f} us", flush=True)
            for r in rows[:4]:
                print(f"      {r['us']:7.1f} us {r['config']}{'' if r['ok'] else '  WRONG RESULT'}", flush=True)
            bad = [r["config"] for r in rows if not r["ok"]]
            if bad:
                print(f"      wrong or failed: {bad}", flush=True)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / args.tune_file).write_text(json.dumps(report, indent=1))
        del pool, pairs
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "loadtest/results")
    parser.add_argument("--tune", action="store_true", help="sweep launch configurations on key cases instead")
    parser.add_argument("--only", default="", help="run only cases whose 'proj/rank/scenario' contains this "
                        "(several, comma-separated: any of them)")
    parser.add_argument("--tune-file", default="kernel_tune_h200.json", help="--tune's JSON file name in --out")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU interpreter")
    parser.add_argument("--no-pdl", action="store_true", help="launch the kernels without programmatic dependent launch")
    parser.add_argument("--compare-no-pdl", action="store_true", help="also time our pair without it")
    parser.add_argument("--compare-pair", action="store_true",
                        help="also time decode cases with the shrink/expand pair where the one-launch kernel "
                        "would run (`ours_pair_us`)")
    parser.add_argument("--tune-kinds", default="shrink,expand,fused", help="--tune: which kernels to sweep")
    parser.add_argument("--compare-tiles16", action="store_true",
                        help="also time decode cases with the shrink on 16-token tl.dot tiles instead of one-token "
                        "GEMV tiles (`ours_tiles16_us`)")
    args = parser.parse_args(argv)
    if args.no_pdl:
        import kernels.triton_shrink as shrink_module
        shrink_module.PDL_ENABLED = False
    global NUM_SLOTS, PROJECTIONS
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        NUM_SLOTS, PROJECTIONS = 64, {"o": (64, (64,)), "qkv": (64, (64, 32, 32))}
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if args.tune:
        return tune(args, device)
    copy_bw = copy_bandwidth(device)
    import triton

    report = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
                  torch=torch.__version__, triton=triton.__version__, copy_bandwidth_GBps=copy_bw / 1e9,
                  method="median of 20 CUDA-graph replays; per pair = replay / pairs", cases=[])
    if device.type == "cuda":
        from kernels.triton_shrink import PDL_MAX_TOKENS, _lora_shrink_kernel, use_pdl
        report["pdl_up_to_tokens"] = PDL_MAX_TOKENS if use_pdl(_lora_shrink_kernel, device) else 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"device copy bandwidth: {copy_bw / 1e9:.0f} GB/s (read + write)", flush=True)
    header = (f"{'proj':4} {'rank':>5} {'scenario':20} {'ours us':>8} {'shr':>6} {'exp':>6} {'GB/s':>6} "
              f"{'%copy':>6} {'bmm us':>8} {'loop us':>8} ok" + ("  nopdl us   shr   exp" if args.compare_no_pdl else ""))
    print(header, flush=True)

    def wanted(case: str) -> bool:
        return not args.only or any(part in case for part in args.only.split(","))

    for proj in PROJECTIONS:
        for rank in RANKS:
            if not any(wanted(f"{proj}/{rank}/{s}") for s in SCENARIOS):
                continue
            pool = Pool(*PROJECTIONS[proj], rank, NUM_SLOTS, device)
            for name in SCENARIOS:
                if not wanted(f"{proj}/{rank}/{name}"):
                    continue
                row = bench_case(proj, rank, name, device, copy_bw, pool, args.compare_no_pdl, args.compare_tiles16,
                                 args.compare_pair)
                report["cases"].append(row)
                extra = ""
                if "ours_pair_us" in row:
                    extra += f"  pair {row['ours_pair_us']:6.1f}"
                if "ours_tiles16_us" in row:
                    extra += f"  tiles16 {row['ours_tiles16_us']:6.1f}"
                if args.compare_no_pdl:
                    extra += (f"  {row['ours_nopdl_us']:8.1f} {row['ours_nopdl_shrink_us']:5.1f} "
                             f"{row['ours_nopdl_expand_us']:5.1f}")
                print(f"{proj:4} {rank!s:>5} {name:20} {row['ours_us']:8.1f} {row['ours_shrink_us']:6.1f} "
                      f"{row['ours_expand_us']:6.1f} {row['ours_GBps']:6.0f} {100 * row['ours_frac_copy']:5.1f}% "
                      f"{row['gather_bmm_us']:8.1f} {row['loop_matmul_us']:8.1f} {'yes' if row['agree'] else 'NO'}"
                      + extra, flush=True)
                (out / "kernel_bench_h200.json").write_text(json.dumps(report, indent=1))
            del pool
            if device.type == "cuda":
                torch.cuda.empty_cache()
    report["targets"] = check_targets(report["cases"])
    for line in report["targets"]:
        print(line)
    (out / "kernel_bench_h200.json").write_text(json.dumps(report, indent=1))
    return 0


def check_targets(cases) -> list[str]:
    """The issue's targets, each figure beside its target."""
    by = {(c["proj"], str(c["rank"]), c["scenario"]): c for c in cases}
    lines = []
    for (proj, rank, name), c in sorted(by.items()):
        f = 100 * c["ours_frac_copy"]
        if name == "decode-distinct-256":
            lines.append(f"target decode T=256 {proj} r{rank}: {f:.0f}% of copy (>= 70%) {'PASS' if f >= 70 else 'MISS'}")
        elif name == "decode-distinct-64":
            lines.append(f"target decode T=64 {proj} r{rank}: {f:.0f}% of copy (>= 50%) {'PASS' if f >= 50 else 'MISS'}")
        elif name == "prefill-8x512":
            ok = f >= 60 and c["ours_us"] < c["loop_matmul_us"]
            lines.append(f"target prefill {proj} r{rank}: {f:.0f}% of copy (>= 60%), {c['ours_us']:.0f} us vs loop "
                         f"{c['loop_matmul_us']:.0f} us (faster) {'PASS' if ok else 'MISS'}")
        if rank == "mixed" and all((proj, str(r), name) in by for r in MIXED_CYCLE):
            # rank-exact prediction: each uniform-rank run's time, weighted by the mixed batch's adapters
            weights = {r: sum(1 for s in set(scenario_slots(name, 0, random.Random(0))) if MIXED_CYCLE[s % 3] == r)
                       for r in MIXED_CYCLE}
            total = sum(weights.values())
            predicted = sum(weights[r] / total * by[(proj, str(r), name)]["ours_us"] for r in MIXED_CYCLE)
            ratio = c["ours_us"] / predicted
            lines.append(f"target mixed {proj} {name}: {c['ours_us']:.1f} us vs rank-exact {predicted:.1f} us = "
                         f"{ratio:.2f}x (<= 1.10) {'PASS' if ratio <= 1.10 else 'MISS'}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
