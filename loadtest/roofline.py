"""The memory roofline of a decode step, and the copy bandwidth it is measured against.

A decode step reads every weight once (the embedding only gathers its rows), the KV cache of
every running sequence up to its context, and the A and B of every distinct adapter in the
batch. At batch sizes where serving runs, that is the whole cost: the step cannot be faster
than those bytes over the device's copy bandwidth, measured in the same run.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

CUDA_BUFFER_BYTES = 1 << 30  # well past every cache
CPU_BUFFER_BYTES = 64 << 20  # the smoke test's figure only exercises the arithmetic
REPEATS = 10


@dataclass(frozen=True)
class DecodeBytes:
    weights: int  # read once per step
    kv_per_token: int  # K and V of one token, every layer
    adapter: int  # A and B of one adapter

    def to_dict(self) -> dict:
        return asdict(self)


def copy_bandwidth(device: str) -> dict:
    """Device-to-device copy bandwidth, bytes read plus bytes written per second (median)."""
    import torch

    on_cuda = device.startswith("cuda")
    nbytes = CUDA_BUFFER_BYTES if on_cuda else CPU_BUFFER_BYTES
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(7)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)  # warm-up: first-touch and clocks
    samples = [_timed_copy(dst, src, on_cuda) for _ in range(REPEATS)]
    del src, dst
    if on_cuda:
        torch.cuda.empty_cache()
    median = statistics.median(samples)
    return {"bytes_per_s": 2 * nbytes / median, "buffer_bytes": nbytes, "median_s": median,
            "samples_s": samples, "device": device}


def _timed_copy(dst, src, on_cuda: bool) -> float:
    import torch

    if not on_cuda:
        start = time.perf_counter()
        dst.copy_(src)
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    dst.copy_(src)
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1000


def roofline(sizes: DecodeBytes, batch: int, context: float, distinct_adapters: int, bandwidth: float | None) -> dict:
    """The bytes of one decode step of `batch` sequences at a mean `context`, and the fastest
    that step can be at `bandwidth` (None when no bandwidth was measured)."""
    kv = sizes.kv_per_token * context * batch
    adapters = sizes.adapter * distinct_adapters
    total = sizes.weights + kv + adapters
    step_s = total / bandwidth if bandwidth else None
    return {"batch": batch, "mean_context": context, "distinct_adapters": distinct_adapters,
            "weight_bytes": sizes.weights, "kv_bytes": int(kv), "adapter_bytes": adapters, "bytes": int(total),
            "step_s": step_s, "tokens_per_s": batch / step_s if step_s else None}
