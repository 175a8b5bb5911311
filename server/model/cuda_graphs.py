"""CUDA graphs of the decode forward: captured once per padded batch size, replayed per step.

A decode step of a 7B model is ~600 kernels of a few microseconds each; launched one by one
from Python the GPU waits on the host. Captured, the whole forward (embedding, every layer's
projections, KV write, paged attention, the LoRA kernels with their metadata, the LM head)
is one replay. This class owns the graphs, the memory pool they share and their logits
output; their inputs are the runner's fixed-address step buffers and LoRA metadata, which
the runner fills before `replay`, so nothing else needs to know that graphs exist.

Two graphs per size: one without LoRA kernels (a batch of base-model tokens only), one with
them (any mix of slots, -1 for base tokens). The LoRA graph is captured on a batch of
distinct slots, the launch configuration the kernels choose for decode batches whose tokens
mostly have adapters of their own; other mixes replay it correctly.

Sizes: 1, 2, 4, 8, then steps of 16 up to the largest batch; a batch is padded to the
smallest size that holds it (padding tokens write no KV and attend to nothing). Capture
runs largest first so smaller graphs reuse the pool's memory.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from server.model.runner import ModelRunner

log = logging.getLogger(__name__)


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size] + list(range(16, max_batch_size, 16))
    return sorted(set(sizes + [max_batch_size]))


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_batch_size: int):
        self.runner = runner
        self.sizes = graph_batch_sizes(min(max_batch_size, runner.buffers.max_seqs))
        model = runner.model
        first = next(model.projections())[2]
        self.num_lora_slots = first.lora.lora_a[0].shape[0] if first.lora is not None else 0
        vocab = model.config.vocab_size
        self.logits = torch.empty(self.sizes[-1], vocab, dtype=torch.float32, device=runner.device)
        self._graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}

    def size_for(self, num_seqs: int) -> int | None:
        """The smallest captured size that holds the batch, None when the batch is too large."""
        for size in self.sizes:
            if size >= num_seqs:
                return size
        return None

    def capture(self) -> None:
        start = time.perf_counter()
        pool = None
        variants = (False, True) if self.num_lora_slots else (False,)
        for size in reversed(self.sizes):
            for with_lora in variants:
                self._forward(size, with_lora)  # eager first: Triton compiles, cuBLAS picks its kernels
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._forward(size, with_lora)
                pool = graph.pool() if pool is None else pool
                self._graphs[(size, with_lora)] = graph
        torch.cuda.synchronize()
        log.info("captured %d decode graphs (batch sizes %s) in %.1f s", len(self._graphs), self.sizes,
                 time.perf_counter() - start)

    def replay(self, size: int, with_lora: bool) -> torch.Tensor:
        """Run the captured forward over the inputs the runner just wrote; logits (size, vocab)."""
        self._graphs[(size, with_lora)].replay()
        return self.logits[:size]

    def _forward(self, size: int, with_lora: bool) -> None:
        runner = self.runner
        if not torch.cuda.is_current_stream_capturing():
            self._write_dummy_inputs(size, with_lora)
        buffers = runner.buffers
        attn = buffers.attention_meta(size, size, 1, runner.model.config.sliding_window)
        lora = runner.lora_meta if with_lora else None
        logits = runner.model(buffers.device_view("input_ids", size), attn, runner.kv_cache, lora, None)
        self.logits[:size].copy_(logits)

    def _write_dummy_inputs(self, size: int, with_lora: bool) -> None:
        """A decode batch of `size` padding sequences (no KV writes, no attention), and for the
        LoRA graph, distinct slots: the metadata's host-side hints pick the kernels' configuration."""
        from server.model.runner import SequenceChunk

        self.runner.buffers.fill([SequenceChunk([0], 0, [0])], pad_to=size)
        if with_lora:
            self.runner.lora_meta.update([t % self.num_lora_slots for t in range(size)])
