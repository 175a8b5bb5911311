"""The engine's decode step with no server around it, on the benchmark's own checkpoint.

The serving benchmark compares the step inside the server against this one (same model,
same batch, same adapters), so the figure is taken in the same run, just before the server
starts, and everything is freed afterwards so the server gets the whole device.
"""

from __future__ import annotations

import gc
import random
import time
import traceback
from pathlib import Path

from loadtest.checkpoint import QKVO

WARM_STEPS = 3
PREFILL_TIMEOUT_S = 300.0


def measure_engine_alone(checkpoint: Path, device: str, batch: int, prompt_tokens: int, decode_steps: int,
                         num_adapters: int, rank: int, closed_loop_tokens: int = 0) -> dict:
    """Mean decode step (s) for the base model and for `num_adapters` distinct adapters
    (sequences round-robin over them); with `closed_loop_tokens`, also the serving phase's own
    workload without the server: `batch` requests of that many output tokens always in flight,
    each finished one replaced at once by a new prompt (so steps mix decodes and prefills as
    the server's do), its tokens/s and mean step. {"error": ...} instead of raising, since the
    serving figures do not depend on it."""
    import torch

    result = {"batch": batch, "prompt_tokens": prompt_tokens, "decode_steps": decode_steps,
              "warm_steps": WARM_STEPS, "num_adapters": num_adapters, "rank": rank, "modules": list(QKVO)}
    try:
        result.update(_measure(checkpoint, device, batch, prompt_tokens, decode_steps, num_adapters, rank,
                               closed_loop_tokens))
    except Exception:  # noqa: BLE001 - reported in the JSON; the traceback is dropped with the frame
        result["error"] = traceback.format_exc(limit=8)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        # what this process still holds while the server runs (a leak here shrinks its KV cache)
        result["device_memory_after"] = {"reserved_bytes": torch.cuda.memory_reserved(device),
                                         "free_bytes": free, "total_bytes": total}
    return result


def _measure(checkpoint: Path, device: str, batch: int, prompt_tokens: int, decode_steps: int,
             num_adapters: int, rank: int, closed_loop_tokens: int) -> dict:
    import torch

    from loadtest.random_model import random_adapter
    from server.config import Settings
    from server.engine.engine import Engine

    start = time.perf_counter()
    context = prompt_tokens + max(WARM_STEPS + decode_steps, closed_loop_tokens) + 8
    settings = Settings(device=device, max_loras=max(1, num_adapters), max_lora_rank=rank, max_num_seqs=batch,
                        max_num_batched_tokens=max(8192, batch * prompt_tokens), max_model_len=context + 16,
                        num_kv_blocks=batch * (-(-context // 16) + 1) + 16)
    engine = Engine.from_dir(checkpoint, settings)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    load_s = time.perf_counter() - start
    vocab = engine.model.config.vocab_size
    token_range = (min(1000, vocab // 2), vocab)

    def step_s(adapters: list[str | None]) -> float:
        return _mean_decode_step(engine, adapters, prompt_tokens, decode_steps, token_range, sync)

    step_s([None] * batch)  # warm-up: allocator growth, cuBLAS and Triton compiles
    base = step_s([None] * batch)
    names = [f"engine-alone-{i}" for i in range(num_adapters)]
    for i, name in enumerate(names):
        engine.add_adapter(name, random_adapter(engine.model.config, rank, QKVO, seed=i, device=str(engine.device),
                                                dtype=engine.dtype))
    adapters = None
    if names:
        per_seq = [names[i % len(names)] for i in range(batch)]
        step_s(per_seq)  # warm-up: loads the slots, compiles the LoRA kernels
        adapters = step_s(per_seq)
    out = {"load_s": load_s, "base_step_s": base, "adapters_step_s": adapters,
           "base_tokens_per_s": batch / base, "adapters_tokens_per_s": batch / adapters if adapters else None,
           "mean_context": prompt_tokens + WARM_STEPS + decode_steps / 2}
    if closed_loop_tokens:
        out["closed_loop"] = {"output_tokens": closed_loop_tokens,
                              "base": _closed_loop(engine, [None] * batch, prompt_tokens, closed_loop_tokens,
                                                   token_range, sync)}
        if names:
            out["closed_loop"]["adapters"] = _closed_loop(engine, [names[i % len(names)] for i in range(batch)],
                                                          prompt_tokens, closed_loop_tokens, token_range, sync)
    return out


def _closed_loop(engine, adapters: list[str | None], prompt_tokens: int, max_tokens: int,
                 token_range: tuple[int, int], sync) -> dict:
    """len(adapters) requests always in flight (request i on adapters[i]), each replaced by a new
    prompt as it finishes. The first wave's lengths are staggered so that finishes spread evenly
    (as in a server's steady state); measured over two request lifetimes once it has drained."""
    from server.engine.request import GenerationRequest, SamplingParams

    rng = random.Random(len(adapters) + max_tokens)

    def submit(slot: int, tokens: int):
        prompt = [rng.randrange(*token_range) for _ in range(prompt_tokens)]
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        return engine.add_request(GenerationRequest(prompt, params, adapter=adapters[slot]))

    live = {submit(i, 1 + i * max_tokens // len(adapters)): i for i in range(len(adapters))}

    def run(steps: int) -> int:
        tokens = 0
        for _ in range(steps):
            for seq in engine.step():
                tokens += 1
                if seq.is_finished and seq in live:
                    slot = live.pop(seq)
                    live[submit(slot, max_tokens)] = slot
        return tokens

    run(max_tokens + 8)  # the staggered first wave drains: every request now is a full one
    sync()
    steps = 2 * max_tokens
    start = time.perf_counter()
    tokens = run(steps)
    sync()
    elapsed = time.perf_counter() - start
    for seq in list(live):
        engine.abort(seq)
    engine.flush()
    return {"tokens_per_s": tokens / elapsed, "step_s": elapsed / steps, "steps": steps}


def _mean_decode_step(engine, adapters: list[str | None], prompt_tokens: int, decode_steps: int,
                        token_range: tuple[int, int], sync) -> float:
    from server.engine.request import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=WARM_STEPS + decode_steps + 8, temperature=0, ignore_eos=True)
    rng = random.Random(len(adapters))
    seqs = [engine.add_request(GenerationRequest([rng.randrange(*token_range) for _ in range(prompt_tokens)],
                                                 params, adapter=a)) for a in adapters]
    deadline = time.monotonic() + PREFILL_TIMEOUT_S
    while any(not s.output_ids for s in seqs):  # prefill everyone (adapters may still be loading)
        if not engine.step():
            time.sleep(0.001)
        if time.monotonic() > deadline:
            raise RuntimeError(f"the batch was not prefilled within {PREFILL_TIMEOUT_S:.0f} s")
    for _ in range(WARM_STEPS):
        engine.step()
    sync()
    # the mean over back-to-back steps, one sync at the end: a sync after every step would stop
    # asynchronous scheduling from overlapping the host's work with the GPU's
    start = time.perf_counter()
    for _ in range(decode_steps):
        engine.step()
    sync()
    elapsed = time.perf_counter() - start
    for seq in seqs:
        engine.abort(seq)
    engine.flush()
    return elapsed / decode_steps
