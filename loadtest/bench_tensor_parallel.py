"""Tensor parallelism over the GPUs of one host (issue 17): the engine's decode step on 1, 2, 4
GPUs, for the base model and with every sequence on its own tenant's adapter.

    PYTHONPATH=. python3 loadtest/bench_tensor_parallel.py --shape llama2-7b --tp 1,2,4 --out DIR
    PYTHONPATH=. python3 loadtest/bench_tensor_parallel.py --shape llama2-70b --tp 2,4 --out DIR

No checkpoint: a 70B bf16 one (140 GB) would not fit a 2-GPU machine's disk. Each rank makes its
own shard of a random model on its GPU (`loadtest/random_model.random_model(..., tp=)`), so the
weights differ from a loaded checkpoint's but not their shapes, bytes or kernels. For each size
the group is spawned fresh (torch.multiprocessing, NCCL): the workers follow rank 0's engine
(server/engine/tp_driver.py) exactly as under `loraplex serve --tensor-parallel-size`; rank 0
registers TENANTS rank-16 q,k,v,o adapters, makes them resident, then for each batch size
prefills PROMPT tokens per sequence and times DECODE_STEPS decode steps (CUDA graphs, which
hold the all-reduces), for the base model and with one distinct adapter per sequence, two ways:
pipelined, as the server runs them (asynchronous scheduling: the host prepares a step while the
device runs the one before; the time between steps is the inter-token latency, ITL, which the
targets and tokens/s use), and each step synchronized (host and device time added: the "step"
columns, which show how much host time pipelining hides).

Reported per size: step (ITL) p50/p90 and tokens/s; against one GPU's run of the same shape,
the step ratio (target at 2 GPUs: <= 0.6 for the 7B) and the LoRA/base throughput ratio (target:
within 5% of one GPU's); the roofline of one rank's bytes (its projections' shard, the whole
replicated LM head, its KV heads' cache, its shard of each adapter) over the copy bandwidth
(target 70B on 2: ITL p50 <= 1.3x); and the all-reduce share of the step, two ways: a profile
of graph-replayed steps on rank 0 (time in NCCL kernels over the profiled steps' time), and the
step's all-reduces alone (2 per layer of a batch x hidden activation, timed in a CUDA graph),
by NCCL and, beside it, by PyTorch's symmetric-memory one-shot and two-shot all-reduces (measured
only: what could replace NCCL's in the forward);
with the same profile, the device's kernel time per step at every size, one GPU included: how
much of the step the device covers, so what halving its work can give at most.

`--one-rank-of 2,4` also runs, in this one process on one GPU, the model one rank of a group of
that size holds (its heads, KV heads and intermediate channels; hidden size, vocabulary and LM
head whole) with adapters of one rank's shard shapes: every kernel of a rank's step except its
all-reduces, so one GPU measures what a rank computes, and the targets say how long each of the
step's 2 x layers all-reduces may then take (`all_reduce_budget_s`). A 70B rank of 2 (70 GB)
fits one H200: `--shape llama2-70b --tp '' --one-rank-of 2,4`.

`--device cpu --shape tiny` is the smoke test's (gloo processes): the same code and JSON.
Writes tensor_parallel_<shape>_h200.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loadtest.bench_quantized import WARM_STEPS, decode_steps
from loadtest.random_model import LLAMA2_7B, LLAMA2_70B, StubTokenizer, random_adapter, random_model
from loadtest.roofline import DecodeBytes, copy_bandwidth, roofline
from server.config import Settings
from server.engine.engine import Engine, build_device_state
from server.engine.tp_driver import worker_loop
from server.model.config import ModelConfig
from server.model.quantized import weight_bytes
from server.model.tensor_parallel import ShardPlan, free_tcp_address, init_tensor_parallel

TINY = dict(LLAMA2_7B, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512)
SHAPES = {"llama2-7b": LLAMA2_7B, "llama2-70b": LLAMA2_70B, "tiny": TINY}
RANK = 16
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
PROFILE_STEPS = 8
TOP_KERNELS = 16  # the profile's kinds of kernel listed, by device time
STEP_RATIO_TARGET = 0.6  # 7B decode step on 2 GPUs over 1 GPU's
ROOFLINE_TARGET = 1.3  # 70B on 2 GPUs, ITL p50 over its roofline
LORA_RATIO_TOLERANCE = 0.05  # LoRA/base throughput ratio under TP against one GPU's


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    parser.add_argument("--tp", default="1,2", help="comma-separated group sizes, e.g. 1,2,4 ('' for none)")
    parser.add_argument("--one-rank-of", default="", help="comma-separated group sizes whose one rank (no "
                        "all-reduce) runs alone on one GPU, e.g. 2,4")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--tenants", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--device", default="cuda", help="cuda; cpu only for the smoke test (--shape tiny)")
    parser.add_argument("--out", default=os.environ.get("OUT", "loadtest/results"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [int(n) for n in args.tp.split(",") if n]
    one_rank_of = [int(n) for n in args.one_rank_of.split(",") if n]
    if any(n < 2 for n in one_rank_of):
        parser.error("--one-rank-of: group sizes of 2 or more")
    for n in one_rank_of:
        one_rank_shape(SHAPES[args.shape], n)  # the shape splits over n (else the shard plan's error), before any run
    if args.device == "cuda" and max(sizes, default=1) > torch.cuda.device_count():
        raise SystemExit(f"--tp {args.tp} needs {max(sizes)} GPUs; this machine has {torch.cuda.device_count()}")
    spec = {"shape": args.shape, "batches": [int(b) for b in args.batches.split(",")], "tenants": args.tenants,
            "prompt": args.prompt, "decode_steps": args.decode_steps, "device": args.device}
    bandwidth = copy_bandwidth("cuda:0" if args.device == "cuda" else "cpu")["bytes_per_s"]
    command = ["PYTHONPATH=.", "python3", "loadtest/bench_tensor_parallel.py",
               *map(shlex.quote, sys.argv[1:] if argv is None else argv)]
    result = {"command": " ".join(command),
              "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
              "gpus_on_host": torch.cuda.device_count() if args.device == "cuda" else 0,
              "copy_bandwidth_bytes_per_s": bandwidth, "torch": torch.__version__, "rank": RANK,
              "modules": list(QKVO), **spec, "runs": [], "one_rank_runs": []}
    path = out / f"tensor_parallel_{args.shape}_h200.json"
    for world, one_rank in [(n, False) for n in sizes] + [(n, True) for n in one_rank_of]:
        run_path = out / f".tp{world}{'-rank' if one_rank else ''}.json"
        start = time.perf_counter()
        if world == 1 or one_rank:
            rank_main(0, 1, "", dict(spec, one_rank_of=world if one_rank else 1), str(run_path))
        else:
            mp.spawn(rank_main, args=(world, free_tcp_address(), spec, str(run_path)), nprocs=world, join=True)
        run = json.loads(run_path.read_text())
        run_path.unlink()
        run["wall_s"] = time.perf_counter() - start
        if one_rank:
            run["one_rank_of"] = world
        for row in run["rows"]:
            roof = roofline(DecodeBytes(**run["rank_bytes"]), row["batch"], run["mean_context"],
                            row["distinct_adapters"], bandwidth)
            row.update(roofline_step_s=roof["step_s"], over_roofline=row["itl_p50_s"] / roof["step_s"])
        result["one_rank_runs" if one_rank else "runs"].append(run)
        print(json.dumps({k: v for k, v in run.items() if k != "rows"}), flush=True)
        path.write_text(json.dumps(result, indent=2))  # after each size
    result["targets"] = targets(result)
    path.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(json.dumps(result["targets"], indent=2))


def rank_main(rank: int, world: int, address: str, spec: dict, out_path: str) -> None:
    """One rank of a group of `world` (rank 0 measures; the others follow its engine)."""
    on_cuda = spec["device"] == "cuda"
    device = f"cuda:{rank}" if on_cuda else "cpu"
    if on_cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    tp = None
    if world > 1:
        tp = init_tensor_parallel(rank, world, address, backend="nccl" if on_cuda else "gloo",
                                  device_index=rank if on_cuda else None)
    shape = one_rank_shape(SHAPES[spec["shape"]], spec.get("one_rank_of", 1))
    batch = max(spec["batches"])
    all_reduce_s = all_reduce_time(tp, batch, shape["hidden_size"], device) if tp is not None else 0.0
    # what NCCL's all-reduce could be replaced by (measured only; the forward uses NCCL's)
    other_all_reduces = {method: symmetric_all_reduce_time(tp, batch, shape["hidden_size"], device, method)
                         for method in SYMMETRIC_METHODS} if tp is not None and on_cuda else {}
    dtype = torch.bfloat16 if on_cuda else torch.float32
    model = random_model(shape, dtype, device, seed=rank, tp=tp)
    max_len = spec["prompt"] + WARM_STEPS + spec["decode_steps"] + 16
    settings = Settings(device=device, dtype=str(dtype).removeprefix("torch."), max_loras=spec["tenants"],
                        max_lora_rank=RANK, max_num_seqs=batch, max_num_batched_tokens=512, max_model_len=max_len,
                        num_kv_blocks=batch * (-(-max_len // 16) + 1) + 16)
    if rank > 0:
        pool, _, _, runner = build_device_state(model, settings)
        worker_loop(runner, pool, tp)
    else:
        run = measure(Engine(model, StubTokenizer(), settings), spec, world, all_reduce_s)
        run["step_all_reduces_alone_by_method_s"] = {
            method: (2 * model.config.num_layers * t if isinstance(t, float) else t)
            for method, t in {"nccl": all_reduce_s, **other_all_reduces}.items()}
        Path(out_path).write_text(json.dumps(run))
    if tp is not None:
        dist.barrier(group=tp.commands)
        dist.destroy_process_group()


def one_rank_shape(shape: dict, world: int) -> dict:
    """The HF config of the model one rank of `world` holds, as a model of its own (rank 0's shard
    plan: its heads, KV heads, intermediate channels; head_dim, hidden size and vocabulary whole)."""
    if world == 1:
        return shape
    local = ShardPlan(ModelConfig.from_hf_dict(shape), 0, world).local_config
    return dict(shape, num_attention_heads=local.num_heads, num_key_value_heads=local.num_kv_heads,
                intermediate_size=local.intermediate_size, head_dim=local.head_dim)


def measure(engine: Engine, spec: dict, world: int, all_reduce_s: float) -> dict:
    """Rank 0: adapters registered and resident, then each batch size with and without them."""
    device = str(engine.device)
    model, cfg = engine.model, engine.model.config
    names = [f"t{i}" for i in range(spec["tenants"])]
    for i, name in enumerate(names):
        engine.add_adapter(name, random_adapter(cfg, RANK, QKVO, seed=i, dtype=engine.dtype))
    batch = max(spec["batches"])
    for start in range(0, len(names), batch):  # every adapter resident in its slot
        decode_steps(engine, names[start : start + batch], device, spec["prompt"], 2)
    rows = []
    for b in spec["batches"]:
        for with_adapters in (False, True):
            adapters = [names[i % len(names)] for i in range(b)] if with_adapters else [None] * b
            decode_steps(engine, adapters, device, spec["prompt"], spec["decode_steps"])  # warm-up at this size
            synced = decode_steps(engine, adapters, device, spec["prompt"], spec["decode_steps"])
            itl = decode_steps(engine, adapters, device, spec["prompt"], spec["decode_steps"], pipelined=True)
            rows.append({"batch": b, "tenants": len(set(adapters)) if with_adapters else 0,
                         "distinct_adapters": len(set(adapters)) if with_adapters else 0,
                         "itl_p50_s": statistics.median(itl), "itl_p90_s": statistics.quantiles(itl, n=10)[-1],
                         "tokens_per_s": b / statistics.median(itl),
                         "step_p50_s": statistics.median(synced),
                         "step_p90_s": statistics.quantiles(synced, n=10)[-1]})
            print(json.dumps({"tp": world, **rows[-1]}), flush=True)
    share = {f"{'tenants' if a else 'base'}": profile_all_reduce_share(engine, names[:batch] if a else [None] * batch,
                                                                        spec)
             for a in (False, True)}
    engine.close()
    weights = weight_bytes(model)
    head = (model.lm_head if model.lm_head is not None else model.embed_tokens.weight).nbytes  # replicated
    shard = model.shard_config
    kv_per_token = 2 * shard.num_layers * shard.num_kv_heads * shard.head_dim * engine.kv_cache.k.element_size()
    one = random_adapter(cfg, RANK, QKVO, seed=0, dtype=engine.dtype)
    adapter = engine.pool.prepare(one).shards[0].nbytes if world > 1 else one.nbytes  # one rank's shard
    return {"tp": world, "rows": rows, "mean_context": spec["prompt"] + WARM_STEPS + spec["decode_steps"] / 2,
            "rank_bytes": {"weights": weights["projections"] + head, "kv_per_token": kv_per_token, "adapter": adapter},
            "step_all_reduces_alone_s": 2 * cfg.num_layers * all_reduce_s, "all_reduce_share_profiled": share,
            "memory": {"weight_bytes": weights, "kv_cache_bytes": engine.kv_cache.nbytes,
                       "adapter_pool_bytes": engine.pool.nbytes,
                       "max_memory_allocated_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda")
                       else None}}


def all_reduce_time(tp, rows: int, hidden: int, device: str, calls: int = 20) -> float:
    """Seconds of one all-reduce of the decode step's (rows, hidden) activation (every rank calls
    this: a collective). On CUDA, timed in a CUDA graph of `calls` of them, as the step replays them."""
    x = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32)
    for _ in range(3):
        tp.all_reduce(x)
    if not device.startswith("cuda"):
        start = time.perf_counter()
        for _ in range(calls):
            tp.all_reduce(x)
        return (time.perf_counter() - start) / calls
    torch.cuda.synchronize()
    return _graph_time(lambda: tp.all_reduce(x), calls)


SYMMETRIC_METHODS = ("symm_mem_one_shot", "symm_mem_two_shot")


def symmetric_all_reduce_time(tp, rows: int, hidden: int, device: str, method: str, calls: int = 20) -> float | str:
    """Seconds of one all-reduce of the (rows, hidden) bf16 activation through PyTorch's symmetric
    memory (peer-to-peer over NVLink: one shot, every rank reads every peer's buffer; two shot, a
    reduce-scatter then an all-gather), the copy into the symmetric buffer included, in a CUDA
    graph as `all_reduce_time`; no multicast (this workplace keeps NVLS off). A string: why it
    could not run (every rank gets the same)."""
    try:
        import torch.distributed._symmetric_memory as symm_mem

        group_name = (tp.group if tp.group is not None else dist.group.WORLD).group_name
        x = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16)
        buffer = symm_mem.empty(rows, hidden, dtype=torch.bfloat16, device=device)
        symm_mem.rendezvous(buffer, group_name)
        out = torch.empty_like(x)

        def reduce():
            buffer.copy_(x)
            if method == "symm_mem_one_shot":
                torch.ops.symm_mem.one_shot_all_reduce_out(buffer, "sum", group_name, out)
            else:
                torch.ops.symm_mem.two_shot_all_reduce_out(buffer, "sum", group_name, out)

        reduce()
        torch.cuda.synchronize()
        expected = x.float().clone()
        dist.all_reduce(expected, group=tp.group)
        agree = torch.tensor([int(torch.allclose(out.float(), expected, rtol=2e-2,
                                                 atol=2e-2 * expected.abs().max().item()))], device=device)
        dist.all_reduce(agree, op=dist.ReduceOp.MIN, group=tp.group)  # every rank times it, or none
        if not agree.item():
            return f"{method}: the sum differs from NCCL's"
        return _graph_time(reduce, calls)
    except Exception as exc:  # an older torch, no peer access: reported, NCCL's figure stands
        return f"{method}: {type(exc).__name__}: {exc}"


def _graph_time(fn, calls: int) -> float:
    """Seconds of one call of `fn` (CUDA work), `calls` of them captured in one CUDA graph, median of 5 replays."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    samples = []
    for _ in range(5):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(begin.elapsed_time(end) / 1000 / calls)
    return statistics.median(samples)


def profile_all_reduce_share(engine: Engine, adapters: list, spec: dict) -> dict:
    """Rank 0's profile of PROFILE_STEPS decode steps (the prefills before them not profiled):
    time in all-reduce kernels (NCCL on CUDA; gloo's ops on the CPU) and, on CUDA, in all kernels,
    per step and as shares of the steps' wall time (each step synchronized: what the device does
    not cover is the host's launch and scheduling)."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = engine.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    prof = profile(activities=activities)
    times = decode_steps(engine, adapters, str(engine.device), spec["prompt"], PROFILE_STEPS, around_steps=prof)
    reduce_s = kernels_s = 0.0
    kernels = []  # (seconds, calls, name) of each kind of device kernel over the profiled steps
    for event in prof.key_averages():
        name = event.key.lower()
        on_device = on_cuda and event.device_type.name == "CUDA"
        if on_device:
            kernels_s += event.self_device_time_total / 1e6
            kernels.append((event.self_device_time_total / 1e6, event.count, event.key))
        if "allreduce" in name or "all_reduce" in name:
            if on_device and "nccl" in name:
                reduce_s += event.device_time_total / 1e6
            elif not on_cuda and name.startswith("gloo"):
                reduce_s += event.cpu_time_total / 1e6
    steps_s = sum(times)
    return {"all_reduce_s_per_step": reduce_s / PROFILE_STEPS, "step_s": steps_s / PROFILE_STEPS,
            "share": reduce_s / steps_s if steps_s else None,
            "kernels_s_per_step": kernels_s / PROFILE_STEPS if on_cuda else None,
            "kernels_share": kernels_s / steps_s if on_cuda and steps_s else None,
            # how many kernels a step launches (each a gap on the device) and where its time goes
            "kernel_launches_per_step": sum(calls for _, calls, _ in kernels) / PROFILE_STEPS if on_cuda else None,
            "top_kernels": [{"name": name[:100], "s_per_step": t / PROFILE_STEPS, "calls_per_step": calls / PROFILE_STEPS}
                            for t, calls, name in sorted(kernels, reverse=True)[:TOP_KERNELS]]}


def targets(result: dict) -> dict:
    runs = {run["tp"]: run for run in result["runs"]}
    batch = max(result["batches"])

    def row(tp: int, tenants: bool) -> dict:
        return batch_row(runs[tp], batch, tenants)

    t = {}
    for tp in sorted(runs):
        lora_ratio = row(tp, True)["tokens_per_s"] / row(tp, False)["tokens_per_s"]
        t[f"tp{tp}"] = {"itl_p50_base_s": row(tp, False)["itl_p50_s"], "itl_p50_tenants_s": row(tp, True)["itl_p50_s"],
                        "lora_over_base_throughput": lora_ratio,
                        "over_roofline_base": row(tp, False)["over_roofline"]}
        if 1 in runs and tp > 1:
            t[f"tp{tp}"].update(step_over_one_gpu_base=row(tp, False)["itl_p50_s"] / row(1, False)["itl_p50_s"],
                                synced_step_over_one_gpu_base=row(tp, False)["step_p50_s"] / row(1, False)["step_p50_s"],
                                scaling_efficiency=row(1, False)["itl_p50_s"] / row(tp, False)["itl_p50_s"] / tp,
                                lora_ratio_vs_one_gpu=lora_ratio / t["tp1"]["lora_over_base_throughput"] - 1)
    if result["shape"] == "llama2-7b" and "tp2" in t and "step_over_one_gpu_base" in t["tp2"]:
        t["7b_2gpu_step_target"] = f"<= {STEP_RATIO_TARGET}: {'met' if t['tp2']['step_over_one_gpu_base'] <= STEP_RATIO_TARGET else 'missed'}"
    if result["shape"] == "llama2-70b" and "tp2" in t:
        met = t["tp2"]["over_roofline_base"] <= ROOFLINE_TARGET
        t["70b_2gpu_roofline_target"] = f"<= {ROOFLINE_TARGET}x: {'met' if met else 'missed'}"
    layers = SHAPES[result["shape"]]["num_hidden_layers"]
    for run in result.get("one_rank_runs", []):
        t[f"one_rank_of_{run['one_rank_of']}"] = one_rank_figures(run, runs, batch, layers, result["shape"])
    for tp in sorted(runs):
        if tp > 1 and "lora_ratio_vs_one_gpu" in t[f"tp{tp}"]:
            met = abs(t[f"tp{tp}"]["lora_ratio_vs_one_gpu"]) <= LORA_RATIO_TOLERANCE
            t[f"tp{tp}_lora_ratio_target"] = f"within {LORA_RATIO_TOLERANCE:.0%}: {'met' if met else 'missed'}"
    return t


def batch_row(run: dict, batch: int, tenants: bool) -> dict:
    """`run`'s row at `batch` sequences, base model or one tenant's adapter each."""
    return next(r for r in run["rows"] if r["batch"] == batch and (r["tenants"] > 0) == tenants)


def one_rank_figures(run: dict, runs: dict, batch: int, layers: int, shape: str) -> dict:
    """What one rank of `run['one_rank_of']` measured alone (no all-reduce) says: its step against
    one GPU's, its LoRA/base ratio, and how long each of the step's 2 x `layers` all-reduces may
    take for the issue's target of that shape to be met (negative: missed whatever they cost);
    with a real group of that size measured too, what its all-reduces did cost per step."""
    n = run["one_rank_of"]
    base, tenants = batch_row(run, batch, False), batch_row(run, batch, True)
    f = {"itl_p50_base_s": base["itl_p50_s"], "itl_p50_tenants_s": tenants["itl_p50_s"],
         "lora_over_base_throughput": tenants["tokens_per_s"] / base["tokens_per_s"],
         "over_roofline_base": base["over_roofline"], "all_reduces_per_step": 2 * layers}
    one_gpu = runs.get(1)
    if one_gpu is not None:
        one, one_tenants = batch_row(one_gpu, batch, False), batch_row(one_gpu, batch, True)
        f["step_over_one_gpu_base"] = base["itl_p50_s"] / one["itl_p50_s"]
        f["lora_ratio_vs_one_gpu"] = f["lora_over_base_throughput"] / (one_tenants["tokens_per_s"] / one["tokens_per_s"]) - 1
        if shape == "llama2-7b" and n == 2:
            f["all_reduce_budget_s"] = (STEP_RATIO_TARGET * one["itl_p50_s"] - base["itl_p50_s"]) / (2 * layers)
    if shape == "llama2-70b" and n == 2:
        f["all_reduce_budget_s"] = (ROOFLINE_TARGET * base["roofline_step_s"] - base["itl_p50_s"]) / (2 * layers)
    if n in runs:  # the real group's step less its rank's compute: what communication cost
        real = batch_row(runs[n], batch, False)
        f["group_step_over_one_rank_alone"] = real["itl_p50_s"] / base["itl_p50_s"]
        f["communication_s_per_step"] = real["itl_p50_s"] - base["itl_p50_s"]
    return f


def table(result: dict) -> str:
    lines = [f"{'TP':>3} {'batch':>5} {'tenants':>7} {'ITL p50 ms':>10} {'p90 ms':>7} {'roofline ms':>11} "
             f"{'x roof':>6} {'tok/s':>8} {'synced step p50 ms':>18}"]
    for run in result["runs"]:
        for r in run["rows"]:
            lines.append(_table_row(str(run["tp"]), r))
        profiled = run["all_reduce_share_profiled"].items()
        if run["tp"] > 1:
            lines.append(f"   all-reduces alone per step: {1000 * run['step_all_reduces_alone_s']:.2f} ms; profiled share: "
                         + ", ".join(f"{k} {v['share']:.1%}" for k, v in profiled if v["share"] is not None))
            lines.append("   the step's all-reduces alone by method: " + ", ".join(
                f"{k} {1000 * v:.2f} ms" if isinstance(v, float) else v
                for k, v in run.get("step_all_reduces_alone_by_method_s", {}).items()))
        if any(v.get("kernels_s_per_step") for _, v in profiled):
            lines.append("   device kernels per step (profiled): " + ", ".join(
                f"{k} {1000 * v['kernels_s_per_step']:.2f} ms ({v['kernels_share']:.0%} of the step)"
                for k, v in profiled if v.get("kernels_s_per_step")))
    for run in result.get("one_rank_runs", []):
        for r in run["rows"]:
            lines.append(_table_row(f"1/{run['one_rank_of']}", r))
        kernels = [f"{k} {1000 * v['kernels_s_per_step']:.2f} ms" for k, v in run["all_reduce_share_profiled"].items()
                   if v.get("kernels_s_per_step")]
        if kernels:
            lines.append(f"   one rank of {run['one_rank_of']} alone (no all-reduce), device kernels per step: "
                         + ", ".join(kernels))
    return "\n".join(lines)


def _table_row(group: str, r: dict) -> str:
    return (f"{group:>3} {r['batch']:5d} {r['tenants']:7d} {1000 * r['itl_p50_s']:10.2f} {1000 * r['itl_p90_s']:7.2f} "
            f"{1000 * r['roofline_step_s']:11.2f} {r['over_roofline']:6.2f} {r['tokens_per_s']:8.0f} "
            f"{1000 * r['step_p50_s']:18.2f}")


if __name__ == "__main__":
    main()
