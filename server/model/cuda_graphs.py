"""CUDA graphs of the model's step: captured once per padded shape, replayed per step.

A step of a 7B model is ~600 kernels of a few microseconds each; launched one by one from
Python the GPU waits on the host (an eager mixed step measured 2-5x its GPU time). Captured,
the whole forward (embedding, every layer's projections, KV write, paged attention, the LoRA
kernels with their metadata, the LM head at each sequence's last token) is one replay. This
class owns the graphs, the memory pool they share and their logits output; their inputs are
the runner's fixed-address step buffers and LoRA metadata, which the runner fills (padded to
the graph's shape) before `replay`, so nothing else needs to know that graphs exist.

Two families of shapes:
- decode: B sequences of one token each, B in 1, 2, 4, 8, then steps of 16 up to the largest
  batch; a batch is padded to the smallest size that holds it.
- mixed: prefill chunks beside decodes (in a closed loop about every other step has a new
  prompt), T tokens padded to 128, 192, 256, ... 512, 768, 1024, 1536, then doubling up to the
  step's token budget, sequences padded to min(T, the most running at once), the attention's
  prefill launch sized for a query run of T tokens in each of MAX_GRAPH_PREFILLS prompt slots.
Padding tokens write no KV (slot -1) and belong to no sequence; padding sequences have no
query tokens: neither reaches a real row's result.

Five graphs per shape: one without LoRA kernels (a batch of base-model tokens only), one with
them on every projection (any mix of slots, -1 for base tokens), one with them on the
attention projections only (q/k/v and o), for batches whose adapters target nothing else, the
most common kind: it skips the MLP's shrink and expand launches, which for such adapters only
read and rewrite the output (measured half the LoRA launches of a 7B step); and the same two
for batches holding a DoRA adapter, with DoRA's scaling launch after each projection's LoRA
kernels (kernels/triton_dora.py), so LoRA-only batches never pay for that launch and q/k/v/o
DoRA batches still skip the MLP's (64 q/k/v/o DoRA adapters on the H200: 0.85x their LoRA
twins' throughput with one DoRA graph for every projection, 0.98x with these two). The LoRA kernels choose their launch
configuration from the metadata's host-side hints at capture: decode graphs are captured on
distinct slots (what decode batches mostly are), mixed graphs on half distinct slots and half
one long run; other mixes replay correctly, at the captured configuration's speed.
Capture runs largest first so smaller graphs reuse the pool's memory.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from server.model.llama import ALL_PROJECTIONS, ATTENTION_PROJECTIONS, DORA

if TYPE_CHECKING:
    from server.model.runner import ModelRunner

log = logging.getLogger(__name__)
# Mixed steps are padded to the next of these token counts (then doubling): at 100-300 tokens a
# 7B step turns compute-bound, so padding 192 tokens to 256 would cost ~1 ms.
MIXED_TOKEN_SIZES = (128, 192, 256, 320, 384, 448, 512, 768, 1024, 1536)
# Sequences of several query tokens (prompt chunks) a mixed graph's prefill attention launch has
# programs for (kernels/triton_attention.py, `prefill_seqs`): a grid over every padded sequence
# was mostly programs that exit at once, 17 waves of them a layer at 72 sequences. The default
# token budget (2048) holds 16 prompts of 128 tokens; a step with more runs eagerly.
MAX_GRAPH_PREFILLS = 16


def decode_batch_sizes(max_batch_size: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size] + list(range(16, max_batch_size, 16))
    return sorted(set(sizes + [max_batch_size]))


def mixed_token_sizes(max_tokens: int) -> list[int]:
    sizes = [t for t in MIXED_TOKEN_SIZES if t < max_tokens]
    size = MIXED_TOKEN_SIZES[-1] * 2
    while size < max_tokens:
        sizes.append(size)
        size *= 2
    return sizes + [max_tokens]


class StepGraphs:
    def __init__(self, runner: ModelRunner, max_batch_size: int):
        self.runner = runner
        buffers = runner.buffers
        self.max_seqs = min(max_batch_size, buffers.max_seqs)
        self.decode_sizes = decode_batch_sizes(self.max_seqs)
        self.mixed_sizes = mixed_token_sizes(buffers.max_tokens)
        self.num_lora_slots = runner.num_lora_slots
        vocab = runner.model.config.vocab_size
        self.logits = torch.empty(self.max_seqs, vocab, dtype=torch.float32, device=runner.device)
        self._graphs: dict[tuple[str, int, str | None], torch.cuda.CUDAGraph] = {}

    def shape_for(self, num_tokens: int, num_seqs: int, num_prefills: int = 0) -> tuple[str, int] | None:
        """("decode", B_pad) or ("mixed", T_pad) for a step, None when no graph holds it (more
        sequences than captured, or more than MAX_GRAPH_PREFILLS sequences of several tokens)."""
        if num_seqs > self.max_seqs:
            return None
        if num_tokens == num_seqs:
            return "decode", next(b for b in self.decode_sizes if b >= num_seqs)
        if num_prefills > MAX_GRAPH_PREFILLS:
            return None
        for size in self.mixed_sizes:
            if size >= num_tokens:
                return "mixed", size
        return None

    def padding(self, kind: str, size: int) -> tuple[int, int]:
        """(tokens, sequences) a step of this shape is padded to: a step has no more sequences
        than tokens, so a mixed shape of T tokens needs at most min(T, max_seqs) of them."""
        return (size, size) if kind == "decode" else (size, min(size, self.max_seqs))

    def capture(self) -> None:
        start = time.perf_counter()
        pool = None
        variants = (None, "attention", "all", "attention_dora", "dora") if self.num_lora_slots else (None,)
        shapes = [("mixed", t) for t in reversed(self.mixed_sizes)] + [("decode", b) for b in reversed(self.decode_sizes)]
        for kind, size in shapes:
            for lora in variants:
                self._write_dummy_inputs(kind, size, lora is not None)
                self._forward(kind, size, lora)  # eager first: Triton compiles, cuBLAS picks its kernels
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._forward(kind, size, lora)
                pool = graph.pool() if pool is None else pool
                self._graphs[(kind, size, lora)] = graph
        torch.cuda.synchronize()
        log.info("captured %d step graphs (decode batch sizes %s, mixed token sizes %s) in %.1f s",
                 len(self._graphs), self.decode_sizes, self.mixed_sizes, time.perf_counter() - start)

    @staticmethod
    def lora_variant(projections: frozenset | None) -> str:
        """The LoRA graph for a batch whose adapters target `projections` (None: any, DoRA included)."""
        if projections is None:
            return "dora"
        attention_only = projections - {DORA} <= ATTENTION_PROJECTIONS
        if DORA in projections:
            return "attention_dora" if attention_only else "dora"
        return "attention" if attention_only else "all"

    def replay(self, kind: str, size: int, lora: str | None) -> torch.Tensor:
        """Run the captured forward over the inputs the runner just wrote; logits (sequences, vocab).
        `lora`: None (no adapter in the batch), "attention", "all", "attention_dora" or "dora" (see
        `lora_variant`)."""
        self._graphs[(kind, size, lora)].replay()
        return self.logits[: self.padding(kind, size)[1]]

    def _forward(self, kind: str, size: int, lora_variant: str | None) -> None:
        runner = self.runner
        with_lora = lora_variant is not None
        runner.lora_meta.projections = {"attention": ATTENTION_PROJECTIONS, "all": ALL_PROJECTIONS,
                                        "attention_dora": ATTENTION_PROJECTIONS | {DORA}}.get(lora_variant)
        num_tokens, num_seqs = self.padding(kind, size)
        max_query_len = 1 if kind == "decode" else num_tokens
        attn = runner.buffers.attention_meta(num_tokens, num_seqs, max_query_len, runner.model.config.sliding_window,
                                             num_prefill_slots=0 if kind == "decode" else MAX_GRAPH_PREFILLS)
        lora = runner.lora_meta if with_lora else None
        logits_indices = None if kind == "decode" else runner.buffers.device_view("logits_indices", num_seqs)
        logits = runner.model(runner.buffers.device_view("input_ids", num_tokens), attn, runner.kv_cache, lora,
                              logits_indices)
        self.logits[:num_seqs].copy_(logits)

    def _write_dummy_inputs(self, kind: str, size: int, with_lora: bool) -> None:
        """One real one-token sequence (scratch KV in block 0) plus padding; for the LoRA graphs
        token slots whose host-side hints pick the configuration (see the module docstring)."""
        from server.model.runner import SequenceChunk

        num_tokens, num_seqs = self.padding(kind, size)
        self.runner.buffers.fill([SequenceChunk([0], 0, [0])], pad_tokens=num_tokens, pad_seqs=num_seqs)
        if with_lora:
            # decode shapes: every token its own slot; mixed shapes: half the tokens distinct
            # (decodes), the other half one run (a prompt). Mixed shapes may hold fewer tokens
            # than sequences (128 tokens, 256 sequences): the pattern follows the tokens.
            distinct = num_tokens if kind == "decode" else min(num_seqs, num_tokens // 2)
            slots = [t % self.num_lora_slots for t in range(distinct)] + [0] * (num_tokens - distinct)
            self.runner.lora_meta.update(slots)
