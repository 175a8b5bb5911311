"""The engine: one resident model, registered adapters, and batched generation.

Each step is `schedule()` -> `run()` -> `postprocess()`: admit waiting sequences while KV
blocks and adapter slots allow, feed every running sequence's uncached tokens as one
flattened batch (prefills and decodes together, each token with its own adapter), then
sample, append and retire. `generate()` drives steps until its requests finish.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from server.config import Settings
from server.engine.block_manager import BlockAllocator
from server.engine.request import GenerationRequest, GenerationResult
from server.engine.sampler import sample
from server.engine.sequence import Sequence, SequenceStatus
from server.lora.adapter import LoRAAdapter
from server.lora.pool import AdapterPool
from server.lora.slots import SlotTable
from server.model.kv_cache import KVCache
from server.model.loader import load_model
from server.model.runner import ModelRunner, SequenceChunk

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_KV_CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class EngineLimits:
    max_num_seqs: int
    max_model_len: int
    num_kv_blocks: int
    kv_block_size: int
    max_loras: int
    max_lora_rank: int


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dtype == "auto":
        return dev, (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    return dev, _DTYPES[dtype]


class Engine:
    def __init__(self, model_dir: str | Path, settings: Settings):
        self.device, self.dtype = resolve_device_dtype(settings.device, settings.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = load_model(model_dir, self.dtype, self.device)
        cfg = self.model.config
        self.limits = _limits(settings, cfg, self.dtype)
        self.kv_cache = KVCache(
            cfg.num_layers, self.limits.num_kv_blocks, self.limits.kv_block_size,
            cfg.num_kv_heads, cfg.head_dim, self.dtype, self.device,
        )
        self.blocks = BlockAllocator(self.limits.num_kv_blocks, self.limits.kv_block_size)
        self.pool = AdapterPool(self.model, self.limits.max_loras, self.limits.max_lora_rank)
        self.slots = SlotTable(self.limits.max_loras)
        self.runner = ModelRunner(self.model, self.kv_cache, self.device)
        self.adapters: dict[str, LoRAAdapter] = {}
        self.eos_ids = _eos_ids(self.tokenizer, cfg)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> "Engine":
        from server.model.prepare import prepare_model

        return cls(prepare_model(settings, settings.model), settings)

    # -- adapters -------------------------------------------------------------------------

    def add_adapter(self, adapter_id: str, source: LoRAAdapter | str | Path) -> LoRAAdapter:
        """Register (or replace, when unused) an adapter, from a PEFT directory or parsed."""
        if not isinstance(source, LoRAAdapter):
            from server.lora.peft import load_peft_adapter_dir

            source = load_peft_adapter_dir(Path(source), self.model.config, max_rank=self.limits.max_lora_rank)
        self.slots.evict(adapter_id)  # a replaced adapter must be reloaded into its slot
        self.adapters[adapter_id] = source
        return source

    # -- generation -----------------------------------------------------------------------

    def encode(self, request: GenerationRequest) -> list[int]:
        if not isinstance(request.prompt, str):
            return list(request.prompt)
        if request.chat:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": request.prompt}], add_generation_prompt=True, tokenize=False
            )
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(request.prompt)

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        seqs = [self._new_sequence(r) for r in requests]
        self.waiting.extend(seqs)
        while not all(s.is_finished for s in seqs):
            self.step()
        return [
            GenerationResult(s.text, list(s.output_ids), s.finish_reason, len(s.prompt_ids)) for s in seqs
        ]

    def _new_sequence(self, request: GenerationRequest) -> Sequence:
        if request.adapter is not None and request.adapter not in self.adapters:
            raise KeyError(f"unknown adapter {request.adapter!r}")
        prompt_ids = self.encode(request)
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.limits.max_model_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in a {self.limits.max_model_len}-token context")
        generator = None
        if request.sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(request.sampling.seed)
        return Sequence(request=request, prompt_ids=prompt_ids, generator=generator)

    def step(self) -> None:
        scheduled = self.schedule()
        if not scheduled:
            raise RuntimeError("no sequence can be scheduled: the KV cache is too small for the waiting prompt")
        logits = self.run(scheduled)
        self.postprocess(scheduled, logits)

    def schedule(self) -> list[Sequence]:
        """Give every running sequence room for its next token (preempting the newest when
        blocks run out), then admit waiting sequences first come, first served."""
        running: list[Sequence] = []
        for seq in self.running:
            need = self.blocks.blocks_needed(seq.num_tokens, len(seq.block_table))
            while not self.blocks.can_allocate(need) and self.running[-1] is not seq:
                self._preempt(self.running.pop())
            if not self.blocks.can_allocate(need):
                self._preempt(seq)
                break
            seq.block_table += self.blocks.allocate(need)
            running.append(seq)
        self.running = running
        while self.waiting and len(self.running) < self.limits.max_num_seqs:
            seq = self.waiting[0]
            need = self.blocks.blocks_needed(seq.num_tokens + 1)
            adapter_ok = seq.adapter_id is None or self.slots.can_acquire(seq.adapter_id)
            if not (adapter_ok and self.blocks.can_allocate(need)):
                break
            self.waiting.popleft()
            seq.block_table = self.blocks.allocate(need)
            if seq.adapter_id is not None:
                slot, needs_load = self.slots.acquire(seq.adapter_id)
                if needs_load:
                    self.pool.load(slot, self.adapters[seq.adapter_id])
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        return list(self.running)

    def run(self, seqs: list[Sequence]) -> torch.Tensor:
        chunks = [
            SequenceChunk(
                token_ids=seq.uncached_ids,
                start_position=seq.num_cached_tokens,
                block_table=seq.block_table,
                lora_slot=-1 if seq.adapter_id is None else self.slots.slot_of(seq.adapter_id),
            )
            for seq in seqs
        ]
        return self.runner.run(chunks)

    def postprocess(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        tokens = sample(logits, [s.sampling for s in seqs], [s.generator for s in seqs])
        for seq, token in zip(seqs, tokens):
            seq.num_cached_tokens = seq.num_tokens
            seq.output_ids.append(token)
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self._finish(seq, reason)
        self.running = [s for s in self.running if not s.is_finished]

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.sampling
        if token in self.eos_ids and not params.ignore_eos:
            seq.output_ids.pop()  # the EOS token is not part of the answer
            seq.text = self._decode(seq.output_ids)
            return "stop"
        seq.text = self._decode(seq.output_ids)
        for stop in params.stop:
            cut = seq.text.find(stop)
            if cut >= 0:
                seq.text = seq.text[:cut]
                return "stop"
        if len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= self.limits.max_model_len:
            return "length"
        return None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self._release(seq)

    def _preempt(self, seq: Sequence) -> None:
        """Recompute-style preemption: drop its KV blocks, requeue it at the front."""
        self.num_preemptions += 1
        self._release(seq)
        seq.num_cached_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.block_table = []
        if seq.adapter_id is not None and seq.status is not SequenceStatus.WAITING:
            self.slots.release(seq.adapter_id)


def _limits(settings: Settings, cfg, dtype: torch.dtype) -> EngineLimits:
    max_model_len = settings.max_model_len or min(cfg.max_position_embeddings, 8192)
    num_blocks = settings.num_kv_blocks
    if num_blocks == 0:
        per_block = KVCache.bytes_per_block(cfg.num_layers, settings.kv_block_size, cfg.num_kv_heads, cfg.head_dim, dtype)
        wanted = settings.max_num_seqs * -(-max_model_len // settings.kv_block_size)
        num_blocks = max(1, min(wanted, CPU_KV_CACHE_BYTES // per_block))
    return EngineLimits(
        max_num_seqs=settings.max_num_seqs,
        max_model_len=max_model_len,
        num_kv_blocks=num_blocks,
        kv_block_size=settings.kv_block_size,
        max_loras=settings.max_loras,
        max_lora_rank=settings.max_lora_rank,
    )


def _eos_ids(tokenizer, cfg) -> set[int]:
    ids = set(cfg.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
