"""Turns one step's work (token runs of many sequences) into the model's flat tensors.

The engine says, for each sequence, which tokens to feed, where they start, its KV block
table and its LoRA slot; the runner lays them end to end, builds the attention and LoRA
metadata once for the step, and returns the logits of each sequence's last fed token.

Every int32 input of a step (token ids, positions, KV slots, query offsets, context lengths,
block tables, logits rows) is written into one page-locked host buffer and reaches the GPU in
one copy, into a device buffer of the same layout that lives as long as the runner; the LoRA
metadata is one preallocated object refilled in place. Fixed addresses are what lets steps
replay CUDA graphs (server/model/cuda_graphs.py): a step that fits a captured shape is padded
to it and replayed; others (and every step on the CPU) run eagerly on the same buffers.

The host buffer is rewritten by the next step only once the previous copy out of it is done
(an event; in the engine the step's token read-back has already waited for it).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from kernels import LoRABatchMeta
from server.model.attention import AttentionMeta
from server.model.kv_cache import KVCache
from server.model.llama import LlamaModel

DEFAULT_MAX_SEQS = 256
DEFAULT_MAX_TOKENS = 2048


def select_blas_library(setting: str, device: torch.device) -> None:
    """Which library torch hands the projections' GEMMs to, on CUDA (a process-wide choice, made
    before any graph is captured). auto = cuBLASLt: on an H200 at 64 rows it ran the 7B's down
    projection at 83% of copy bandwidth against cuBLAS's 70%, and at 192 rows (a decode batch
    with a prompt) most shapes 5-25% faster (loadtest/bench_gemm.py); its choice of kernel is
    still its own heuristic's."""
    if device.type == "cuda":
        torch.backends.cuda.preferred_blas_library("cublas" if setting == "cublas" else "cublaslt")


@dataclass
class SequenceChunk:
    token_ids: list[int]  # tokens fed this step (a prefill chunk, or the one decode token)
    start_position: int  # position of token_ids[0] in the sequence (= tokens already cached)
    block_table: list[int]  # KV blocks of the sequence, enough for start_position + len(token_ids)
    lora_slot: int = -1  # adapter pool slot, -1 = base model
    # >= 0: the last token's id is not known on the host yet (asynchronous scheduling); the
    # device reads it from this row of the previous step's sampled tokens
    pending_row: int = -1
    all_logits: bool = False  # logits of every token of the chunk, not only the last (prompt logprobs)


class StepBuffers:
    """The step's int32 inputs, in a fixed layout on the host (pinned) and on the device.

    Regions: input_ids, positions, slot_mapping (max_tokens each), logits_indices (max_seqs),
    query_starts (max_seqs + 1), context_lens (max_seqs), pending_dst and pending_src (max_seqs:
    which input tokens come from which row of the previous step's sampled tokens), prefill_seqs
    (max_seqs: the sequences of several tokens, then -1), block_tables (max_seqs x max_blocks,
    last, so a step copies only the rows it uses)."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, block_size: int, device: torch.device):
        self.max_tokens, self.max_seqs, self.max_blocks, self.block_size = max_tokens, max_seqs, max_blocks, block_size
        sizes = {"input_ids": max_tokens, "positions": max_tokens, "slot_mapping": max_tokens,
                 "logits_indices": max_seqs, "query_starts": max_seqs + 1, "context_lens": max_seqs,
                 "pending_dst": max_seqs, "pending_src": max_seqs, "prefill_seqs": max_seqs,
                 "block_tables": max_seqs * max_blocks}
        self._offsets, total = {}, 0
        for name, size in sizes.items():
            self._offsets[name] = (total, size)
            total += size
        on_gpu = device.type == "cuda"
        self.host = torch.zeros(total, dtype=torch.int32, pin_memory=on_gpu)
        # on the CPU the model reads the host buffer itself
        self.device_buffer = torch.zeros(total, dtype=torch.int32, device=device) if on_gpu else self.host
        self._np = self.host.numpy()
        self._copied = torch.cuda.Event() if on_gpu else None  # the last copy out of `host`

    def host_view(self, name: str) -> np.ndarray:
        start, size = self._offsets[name]
        return self._np[start : start + size]

    def device_view(self, name: str, length: int) -> torch.Tensor:
        start, _ = self._offsets[name]
        return self.device_buffer[start : start + length]

    def block_tables(self, num_seqs: int) -> torch.Tensor:
        start, _ = self._offsets["block_tables"]
        return self.device_buffer[start : start + num_seqs * self.max_blocks].view(num_seqs, self.max_blocks)

    def fits(self, num_tokens: int, num_seqs: int, max_blocks: int) -> bool:
        return num_tokens <= self.max_tokens and num_seqs <= self.max_seqs and max_blocks <= self.max_blocks

    def fill(self, chunks: list[SequenceChunk], pad_tokens: int = 0, pad_seqs: int = 0
             ) -> tuple[list[int], list[int], int]:
        """Write the step's inputs and copy them to the device; returns the host query starts,
        context lengths and the number of pending tokens. `pad_tokens` / `pad_seqs` (the shape of
        a captured graph) add padding tokens, which write no KV and belong to no sequence, and
        padding sequences, which have no query tokens and a context of 0."""
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has left `host` (at once, when it synced since)
        num_seqs = len(chunks)
        counts = np.fromiter((len(c.token_ids) for c in chunks), dtype=np.int64, count=num_seqs)
        starts = np.fromiter((c.start_position for c in chunks), dtype=np.int64, count=num_seqs)
        query_starts = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(counts, out=query_starts[1:])
        num_tokens = int(query_starts[-1])
        context_lens = starts + counts
        tables = self.host_view("block_tables").reshape(self.max_seqs, self.max_blocks)
        for i, c in enumerate(chunks):
            tables[i, : len(c.block_table)] = c.block_table
        seq_of_token = np.repeat(np.arange(num_seqs), counts)  # (T,)
        positions = np.arange(num_tokens) + np.repeat(starts - query_starts[:-1], counts)  # (T,)
        blocks = tables[seq_of_token, positions // self.block_size]
        self.host_view("input_ids")[:num_tokens] = list(chain.from_iterable(c.token_ids for c in chunks))
        self.host_view("positions")[:num_tokens] = positions
        self.host_view("slot_mapping")[:num_tokens] = blocks * self.block_size + positions % self.block_size
        self.host_view("logits_indices")[:num_seqs] = query_starts[1:] - 1
        self.host_view("query_starts")[: num_seqs + 1] = query_starts
        self.host_view("context_lens")[:num_seqs] = context_lens
        prefills = np.flatnonzero(counts > 1)
        self.host_view("prefill_seqs")[:] = -1
        self.host_view("prefill_seqs")[: len(prefills)] = prefills
        pending = [(int(query_starts[i + 1]) - 1, c.pending_row) for i, c in enumerate(chunks) if c.pending_row >= 0]
        if pending:
            self.host_view("pending_dst")[: len(pending)], self.host_view("pending_src")[: len(pending)] = zip(*pending)
        if pad_tokens > num_tokens:
            pad = slice(num_tokens, pad_tokens)
            self.host_view("input_ids")[pad] = 0
            self.host_view("positions")[pad] = 0
            self.host_view("slot_mapping")[pad] = -1  # padding writes no KV
        if pad_seqs > num_seqs:
            self.host_view("query_starts")[num_seqs + 1 : pad_seqs + 1] = num_tokens  # no query tokens
            self.host_view("context_lens")[num_seqs:pad_seqs] = 0
            self.host_view("logits_indices")[num_seqs:pad_seqs] = 0
        if self.device_buffer is not self.host:
            end = self._offsets["block_tables"][0] + max(num_seqs, pad_seqs) * self.max_blocks
            self.device_buffer[:end].copy_(self.host[:end], non_blocking=True)
            self._copied.record()
        return query_starts.tolist(), context_lens.tolist(), len(pending)

    def take_pending_tokens(self, num_pending: int, sampled: torch.Tensor) -> None:
        """On the device: the pending input tokens from the previous step's sampled ids."""
        dst = self.device_view("pending_dst", num_pending)
        src = self.device_view("pending_src", num_pending)
        self.device_view("input_ids", self.max_tokens).index_put_((dst,), sampled.index_select(0, src).to(torch.int32))

    def attention_meta(self, num_tokens: int, num_seqs: int, max_query_len: int, sliding_window: int | None,
                       host_query_starts: list[int] | None = None, host_context_lens: list[int] | None = None,
                       num_prefill_slots: int = 0) -> AttentionMeta:
        """`num_prefill_slots` > 0: the prefill attention runs over that many entries of
        prefill_seqs (at least the step's sequences of several tokens) instead of every sequence."""
        return AttentionMeta(
            prefill_seqs=self.device_view("prefill_seqs", num_prefill_slots) if num_prefill_slots else None,
            positions=self.device_view("positions", num_tokens),
            slot_mapping=self.device_view("slot_mapping", num_tokens),
            query_starts=self.device_view("query_starts", num_seqs + 1),
            context_lens=self.device_view("context_lens", num_seqs),
            block_tables=self.block_tables(num_seqs),
            max_query_len=max_query_len,
            sliding_window=sliding_window,
            host_query_starts=host_query_starts,
            host_context_lens=host_context_lens,
        )


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, device: torch.device | str, *,
                 max_num_seqs: int = DEFAULT_MAX_SEQS, max_num_batched_tokens: int = DEFAULT_MAX_TOKENS,
                 max_model_len: int = 0):
        self.model = model
        self.kv_cache = kv_cache
        self.device = torch.device(device)
        self.block_size = kv_cache.block_size
        max_blocks = -(-max_model_len // self.block_size) if max_model_len else kv_cache.num_blocks
        self._capacity = (max(max_num_batched_tokens, max_num_seqs), max_num_seqs, max_blocks)
        self.buffers = StepBuffers(*self._capacity, self.block_size, self.device)
        self.lora_meta = LoRABatchMeta.build([], self.device, capacity=self.buffers.max_tokens)
        self.graphs = None  # StepGraphs once captured (capture_graphs)

    @property
    def num_lora_slots(self) -> int:
        """Adapter slots the model's projections carry (0: no adapter pool attached)."""
        lora = next(self.model.projections())[2].lora
        return lora.lora_a[0].shape[0] if lora is not None else 0

    def warm_up(self, capture_graphs: bool = True) -> None:
        """Before the first request: capture the step graphs (each shape runs eagerly first, so
        Triton compiles and cuBLAS chooses now); without graphs, run prefill and mixed steps of a
        few shapes, with and without adapter slots, for the same reason. The steps write scratch
        keys/values into free KV blocks, which nothing reads."""
        budget = self.buffers.max_tokens
        if capture_graphs and self.device.type == "cuda":
            self.capture_graphs(self.buffers.max_seqs)
            # Steps no graph fits run eagerly, and short prefills among decodes (a prompt's tail
            # after a prefix-cache hit, a user turn) take smaller attention tiles than any graph:
            # compile those variants now (all_logits forces the eager path). Found on an H200: a
            # first wave of 32 cached-prefix requests waited 3.7 s for their first tokens.
            self._warm_up_eagerly([[1, 1, n, n] for n in (3, 12, 24, 48, 96) if 2 + 2 * n <= budget],
                                  all_logits=True)
        else:
            self._warm_up_eagerly([[min(512, budget)], [min(128, budget // 8)] * 8,
                                   [1] * 4 + [min(256, budget - 4)]])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _warm_up_eagerly(self, shapes: list[list[int]], all_logits: bool = False) -> None:
        """Run a step of each shape (query lengths of its sequences), with and without adapter slots."""
        num_slots = self.num_lora_slots
        bs = self.block_size
        for lengths in shapes:
            for with_lora in (False, True) if num_slots else (False,):
                chunks, next_block = [], 0
                for i, n in enumerate(lengths):
                    blocks = -(-n // bs)
                    if next_block + blocks > self.kv_cache.num_blocks:
                        break
                    chunks.append(SequenceChunk([1] * n, 0, list(range(next_block, next_block + blocks)),
                                                lora_slot=i % num_slots if with_lora else -1))
                    next_block += blocks
                if chunks:
                    self.run(chunks, all_logits=all_logits)

    def capture_graphs(self, max_batch_size: int) -> None:
        """Capture the step for decode and mixed shapes (CUDA only; see cuda_graphs.py)."""
        from server.model.cuda_graphs import StepGraphs

        self.graphs = StepGraphs(self, max_batch_size)
        self.graphs.capture()

    def run(self, chunks: list[SequenceChunk], all_logits: bool = False,
            pending_tokens: torch.Tensor | None = None, lora_projections: frozenset | None = None) -> torch.Tensor:
        """Logits (B, vocab) fp32 at each chunk's last token; with all_logits, (T, vocab). Chunks
        marked `all_logits` give a row for each of their tokens (in order, the last one last), the
        others one row: such steps run eagerly.
        `pending_tokens`: the previous step's sampled ids on the device, where chunks' last
        tokens are still pending (SequenceChunk.pending_row). `lora_projections`: the names of
        the projections the chunks' adapters target (None: any); the others skip their LoRA
        kernels."""
        for c in chunks:
            end = c.start_position + len(c.token_ids)
            if end > len(c.block_table) * self.block_size:
                raise ValueError(f"block table of {len(c.block_table)} blocks cannot hold {end} tokens")
        num_seqs = len(chunks)
        token_slots = [c.lora_slot for c in chunks for _ in c.token_ids]
        num_tokens = len(token_slots)
        has_lora = any(s >= 0 for s in token_slots)
        self._ensure_capacity(num_tokens, num_seqs, max(len(c.block_table) for c in chunks))
        num_prefills = sum(len(c.token_ids) > 1 for c in chunks)
        some_rows = any(c.all_logits for c in chunks) and not all_logits
        shape = None
        if not (all_logits or some_rows or self.graphs is None):
            shape = self.graphs.shape_for(num_tokens, num_seqs, num_prefills)
        if shape is not None:
            pad_tokens, pad_seqs = self.graphs.padding(*shape)
            _, _, num_pending = self.buffers.fill(chunks, pad_tokens=pad_tokens, pad_seqs=pad_seqs)
            self._take_pending(num_pending, pending_tokens)
            lora = None
            if has_lora:
                self.lora_meta.update(token_slots + [-1] * (pad_tokens - num_tokens))
                lora = self.graphs.lora_variant(lora_projections)
            return self.graphs.replay(*shape, lora)[:num_seqs]
        query_starts, context_lens, num_pending = self.buffers.fill(chunks)
        self._take_pending(num_pending, pending_tokens)
        max_query_len = max(len(c.token_ids) for c in chunks)
        attn = self.buffers.attention_meta(num_tokens, num_seqs, max_query_len, self.model.config.sliding_window,
                                           query_starts, context_lens, num_prefill_slots=num_prefills)
        lora = None
        if has_lora:
            self.lora_meta.update(token_slots)
            self.lora_meta.projections = lora_projections
            lora = self.lora_meta
        logits_indices = None if all_logits else self.buffers.device_view("logits_indices", num_seqs)
        if some_rows:  # rare (prompt logprobs): an index of its own, made on the host
            rows = [r for i, c in enumerate(chunks)
                    for r in (range(query_starts[i], query_starts[i + 1]) if c.all_logits else (query_starts[i + 1] - 1,))]
            logits_indices = torch.tensor(rows, dtype=torch.int64).to(self.device, non_blocking=True)
        return self.model(self.buffers.device_view("input_ids", num_tokens), attn, self.kv_cache, lora, logits_indices)

    def _take_pending(self, num_pending: int, pending_tokens: torch.Tensor | None) -> None:
        if num_pending:
            if pending_tokens is None:
                raise ValueError("chunks with pending tokens need the previous step's sampled ids")
            self.buffers.take_pending_tokens(num_pending, pending_tokens)

    def _ensure_capacity(self, num_tokens: int, num_seqs: int, max_blocks: int) -> None:
        """Library callers may exceed the defaults; the engine never does (graphs keep the buffers)."""
        if self.buffers.fits(num_tokens, num_seqs, max_blocks):
            return
        if self.graphs is not None:
            raise ValueError(f"a step of {num_tokens} tokens, {num_seqs} sequences, {max_blocks} blocks exceeds "
                             f"the runner's capacity {self._capacity}")
        tokens, seqs, blocks = self._capacity
        self._capacity = (max(tokens, num_tokens, num_seqs), max(seqs, num_seqs), max(blocks, max_blocks))
        self.buffers = StepBuffers(*self._capacity, self.block_size, self.device)
        self.lora_meta = LoRABatchMeta.build([], self.device, capacity=self._capacity[0])
