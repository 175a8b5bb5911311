"""Turns one step's work (token runs of many sequences) into the model's flat tensors.

The engine says, for each sequence, which tokens to feed, where they start, its KV block
table and its LoRA slot; the runner lays them end to end, builds the attention and LoRA
metadata once for the step, and returns the logits of each sequence's last fed token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import LoRABatchMeta
from server.model.attention import AttentionMeta
from server.model.kv_cache import KVCache
from server.model.llama import LlamaModel


@dataclass
class SequenceChunk:
    token_ids: list[int]  # tokens fed this step (a prefill chunk, or the one decode token)
    start_position: int  # position of token_ids[0] in the sequence (= tokens already cached)
    block_table: list[int]  # KV blocks of the sequence, enough for start_position + len(token_ids)
    lora_slot: int = -1  # adapter pool slot, -1 = base model


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, device: torch.device | str):
        self.model = model
        self.kv_cache = kv_cache
        self.device = torch.device(device)
        self.block_size = kv_cache.block_size

    def run(self, chunks: list[SequenceChunk], all_logits: bool = False) -> torch.Tensor:
        """Logits (B, vocab) fp32 at each chunk's last token; with all_logits, (T, vocab)."""
        input_ids, positions, slots, token_slots = [], [], [], []
        query_starts, context_lens = [0], []
        for c in chunks:
            n = len(c.token_ids)
            end = c.start_position + n
            if end > len(c.block_table) * self.block_size:
                raise ValueError(f"block table of {len(c.block_table)} blocks cannot hold {end} tokens")
            pos = range(c.start_position, end)
            input_ids.extend(c.token_ids)
            positions.extend(pos)
            slots.extend(c.block_table[p // self.block_size] * self.block_size + p % self.block_size for p in pos)
            token_slots.extend([c.lora_slot] * n)
            query_starts.append(query_starts[-1] + n)
            context_lens.append(end)
        max_blocks = max(len(c.block_table) for c in chunks)
        tables = [c.block_table + [0] * (max_blocks - len(c.block_table)) for c in chunks]

        dev = self.device
        attn = AttentionMeta(
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_starts=query_starts,
            context_lens=context_lens,
            context_lens_tensor=torch.tensor(context_lens, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int64, device=dev),
            sliding_window=self.model.config.sliding_window,
        )
        lora = LoRABatchMeta.build(token_slots, dev) if any(s >= 0 for s in token_slots) else None
        logits_indices = None
        if not all_logits:
            logits_indices = torch.tensor([e - 1 for e in query_starts[1:]], dtype=torch.int64, device=dev)
        ids = torch.tensor(input_ids, dtype=torch.int64, device=dev)
        return self.model(ids, attn, self.kv_cache, lora, logits_indices)
