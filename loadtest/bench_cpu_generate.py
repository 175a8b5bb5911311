"""Greedy decode throughput on the default model on this CPU: loraplex's engine against
transformers' own `generate`, side by side in one run (median of repeats).

    python loadtest/bench_cpu_generate.py [--tokens 64] [--repeats 3] [--out loadtest/results/cpu_generate.json]

Both run fp32 on the CPU with the same prompts, batch sizes and token counts (EOS ignored so
every sequence decodes exactly --tokens tokens). transformers pads the batch on the left.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from server.config import Settings
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, SamplingParams
from server.model.prepare import prepare_model

PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
    "Explain photosynthesis briefly.", "Who wrote Hamlet?", "Give me a cooking tip.",
    "What is 12 times 7?", "Describe a sunset.",
]


def time_engine(engine: Engine, batch: int, tokens: int) -> float:
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    requests = [GenerationRequest(PROMPTS[i % len(PROMPTS)], params, chat=True) for i in range(batch)]
    start = time.perf_counter()
    results = engine.generate(requests)
    elapsed = time.perf_counter() - start
    assert all(len(r.token_ids) == tokens for r in results)
    return elapsed


def time_transformers(model, tokenizer, engine: Engine, batch: int, tokens: int) -> float:
    ids = [engine.encode(GenerationRequest(PROMPTS[i % len(PROMPTS)], chat=True)) for i in range(batch)]
    width = max(map(len, ids))
    input_ids = torch.tensor([[0] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids, attention_mask=mask, do_sample=False,
            max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0,
        )
    elapsed = time.perf_counter() - start
    assert out.shape[1] == width + tokens
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/cpu_generate.json"))
    args = parser.parse_args()

    settings = Settings.from_env()
    model_dir = prepare_model(settings, settings.model, progress=False)
    engine = Engine.from_dir(model_dir, settings)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    time_engine(engine, 1, 4)  # warm-up both
    time_transformers(hf, engine.tokenizer, engine, 1, 4)

    rows = []
    for batch in args.batches:
        ours = statistics.median(time_engine(engine, batch, args.tokens) for _ in range(args.repeats))
        theirs = statistics.median(time_transformers(hf, engine.tokenizer, engine, batch, args.tokens) for _ in range(args.repeats))
        total = batch * args.tokens
        rows.append({
            "batch": batch, "tokens_per_seq": args.tokens,
            "loraplex_tok_s": total / ours, "transformers_tok_s": total / theirs, "ratio": theirs / ours,
        })
        print(f"batch {batch:3d}: loraplex {total / ours:7.1f} tok/s | transformers {total / theirs:7.1f} tok/s | ratio {theirs / ours:.2f}x")
    report = {
        "benchmark": "greedy decode tokens/s, SmolLM2-135M-Instruct fp32, CPU (prompt prefill included)",
        "command": "python loadtest/bench_cpu_generate.py " + " ".join(f"--{k} {v}" for k, v in [("tokens", args.tokens), ("repeats", args.repeats)]),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
