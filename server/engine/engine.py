"""The engine: one resident model, adapters, and batched generation.

Each step is `schedule()` -> `launch()` -> `complete()`: the scheduler picks the running
decodes and the prefill chunks that fit, `launch` feeds them to the runner as one flattened
batch (each token with its own adapter slot) and samples on the device, `complete` reads the
sampled tokens back, appends them, checks stops and retires. `generate()` drives steps until its
requests finish; the server's engine loop drives the same `step()`.

Asynchronous scheduling (on by default on the GPU): `step()` schedules and launches step N+1
before it completes step N, so the host's work for a step (scheduling, inputs, LoRA metadata,
then detokenizing and stop checks of the previous one, and the server's stream writes) runs
while the GPU computes, and the GPU is never left waiting for it. A decode of N+1 reads its
input token, not yet on the host, from step N's sampled ids on the device (`Sequence.num_pending`).
The price: a sequence that stops at step N (EOS, a stop string, an abort) has run one more
token in N+1, which is dropped; one that reaches its length limit is not scheduled again.
Everything runs on one CUDA stream, so blocks freed at N and reused at N+2 are written in order.

Under tensor parallelism this engine is rank 0's: its runner and adapter pool are
server/engine/tp_driver.py's, which send every step, warm-up and swap-in to the worker ranks
first; `build_device_state` is what every rank builds alike.

Requests that ask for more add work only to the steps they are in: log-probabilities
(server/engine/logprobs.py) one more device -> host copy; a structured output's grammar
(server/engine/grammar.py) needs its sequence's previous token before its mask, so such a step
completes the step in flight once its own forward is queued, before sampling.
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoTokenizer

from server.config import Settings
from server.engine.block_manager import BlockAllocator
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.grammar import Grammars, mask_logits
from server.engine.logprobs import StepLogprobs
from server.engine.request import GenerationRequest, GenerationResult, SamplingParams, TokenLogprob
from server.engine.sampler import sample
from server.engine.scheduler import AdapterResidency, ScheduledChunk, Scheduler, SchedulerConfig
from server.engine.sequence import Sequence, SequenceStatus
from server.engine.tp_driver import DrivenRunner, ShardedAdapterPool
from server.lora.adapter import LoRAAdapter
from server.lora.pool import PAGE_RANK, AdapterPool, pool_projections
from server.lora.registry import InMemoryAdapters
from server.model.kv_cache import KVCache
from server.model.llama import LlamaModel
from server.model.loader import load_model
from server.model.runner import ModelRunner, SequenceChunk, select_blas_library

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_KV_CACHE_BYTES = 1 << 30
NO_PROGRESS_TIMEOUT_S = 60.0
MAX_AUTO_LORA_SLOTS = 512
_UNUSED_ROW = SamplingParams(temperature=0)  # rows that sample nothing this step


@dataclass
class LaunchedStep:
    """A step whose sampled tokens are on their way to the host."""

    sampled: list[tuple[int, Sequence]]  # (row, sequence) of the rows that drew a token
    tokens: torch.Tensor | None  # (rows,) int64 on the device: the next step reads pending tokens here
    host_tokens: torch.Tensor | None  # their copy on the host (page-locked on CUDA)
    copied: object = None  # torch.cuda.Event of that copy; None on the CPU
    logprobs: StepLogprobs | None = None  # only when a request of the step asked for them

    def read_tokens(self) -> list[int]:
        if self.copied is not None:
            self.copied.synchronize()
        return self.host_tokens.tolist() if self.host_tokens is not None else []


@dataclass(frozen=True)
class EngineLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    num_kv_blocks: int
    kv_block_size: int
    max_loras: int  # adapters of max_lora_rank the device pool holds at once
    max_lora_rank: int
    lora_pages: int  # pages of the pool: the most adapters resident at once (all of rank <= a page)


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dtype == "auto":
        return dev, (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    return dev, _DTYPES[dtype]


class Engine:
    def __init__(
        self,
        model: LlamaModel,
        tokenizer,
        settings: Settings,
        make_adapters: Callable[[AdapterPool], AdapterResidency] | None = None,
    ):
        """`make_adapters(pool)` builds the adapter residency over the engine's device pool
        (the server's tiered cache); by default adapters are registered in memory."""
        weight = model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.tokenizer = tokenizer
        self.model = model
        cfg = model.config
        self.pool, self.limits, self.kv_cache, self.runner = build_device_state(model, settings)
        self.tp_group = None  # set by from_dir when it started the group (closed by close())
        if model.tp is not None:  # rank 0 of a tensor-parallel group: every rank runs and loads what this one does
            self.runner = DrivenRunner(self.runner, model.tp)
            self.pool = ShardedAdapterPool(self.pool, model.tp, cfg)
        self.blocks = BlockAllocator(self.limits.num_kv_blocks, self.limits.kv_block_size,
                                     prefix_caching=settings.enable_prefix_caching)
        self.adapters = (make_adapters or InMemoryAdapters)(self.pool)
        self.scheduler = Scheduler(
            SchedulerConfig(self.limits.max_num_seqs, self.limits.max_num_batched_tokens), self.blocks, self.adapters
        )
        self.eos_ids = _eos_ids(self.tokenizer, cfg)
        self.grammars = Grammars(self.tokenizer, cfg.vocab_size, sorted(self.eos_ids))
        self._completed_early: list[Sequence] = []  # by a launch that masks with grammars (see launch)
        self.async_scheduling = _async_scheduling(settings.async_scheduling, self.device)
        self._in_flight: LaunchedStep | None = None
        self.last_step_idle = False  # the last step() ran nothing: waiting on adapter loads
        if self.device.type == "cuda":
            self.runner.warm_up(capture_graphs=not settings.enforce_eager)

    @classmethod
    def from_dir(cls, model_dir: str | Path, settings: Settings, make_adapters=None) -> "Engine":
        """Load a prepared checkpoint directory onto the settings' device and dtype; with
        `tensor_parallel_size` > 1, start the worker processes and load this process's shard
        (rank 0's; `close()` stops the workers)."""
        device, dtype = resolve_device_dtype(settings.device, settings.dtype)
        group = None
        if settings.tensor_parallel_size > 1:
            from server.engine.tp_group import start_group

            group = start_group(settings, model_dir)
            device = group.device
        try:
            model = load_model(model_dir, dtype, device, quantize=settings.quantize or None,
                               tp=None if group is None else group.tp)
            engine = cls(model, AutoTokenizer.from_pretrained(model_dir), settings, make_adapters)
        except BaseException:
            if group is not None:
                group.close()
            raise
        engine.tp_group = group
        return engine

    def close(self) -> None:
        """Release the tensor-parallel workers from their loop, and wait for those this engine
        started (nothing without tensor parallelism). The engine must not step any more."""
        if isinstance(self.runner, DrivenRunner) and not self.runner.stopped:
            self.runner.stop()
        if self.tp_group is not None:
            self.tp_group.close()
            self.tp_group = None
        if isinstance(self.pool, ShardedAdapterPool):
            self.pool.blocks.unlink_all()  # the workers are done with every shared-memory shard

    @classmethod
    def from_settings(cls, settings: Settings) -> "Engine":
        from server.model.prepare import prepare_model

        return cls.from_dir(prepare_model(settings, settings.model), settings)

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    # -- adapters (library use; the server pages adapters through its tiered cache) --------

    def add_adapter(self, adapter_id: str, source: LoRAAdapter | str | Path) -> LoRAAdapter:
        """Register (or replace, when unused) an adapter, from a PEFT directory or parsed."""
        if not isinstance(source, LoRAAdapter):
            from server.lora.peft import load_peft_adapter_dir

            source = load_peft_adapter_dir(Path(source), self.model.config, max_rank=self.limits.max_lora_rank)
        self.adapters.register(adapter_id, source)
        return source

    # -- requests -------------------------------------------------------------------------

    def encode(self, request: GenerationRequest) -> list[int]:
        if not isinstance(request.prompt, str):
            return list(request.prompt)
        if request.chat:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": request.prompt}], add_generation_prompt=True, tokenize=False
            )
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(request.prompt)

    def make_sequence(self, request: GenerationRequest, adapter_key=None) -> Sequence:
        """Tokenize and validate a request (any thread). `adapter_key` defaults to `request.adapter`."""
        prompt_ids = self.encode(request)
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.limits.max_model_len:
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens leaves no room in a {self.limits.max_model_len}-token context"
            )
        if len(prompt_ids) + 1 > self.blocks.num_blocks * self.blocks.block_size:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit the KV cache")
        seed = request.sampling.seed
        if seed is None:
            seed = random.getrandbits(63)
        key = adapter_key if adapter_key is not None else request.adapter
        limit = min(len(prompt_ids) + request.sampling.max_tokens, self.limits.max_model_len)
        seq = Sequence(request=request, prompt_ids=prompt_ids, seed=seed, adapter_key=key, token_limit=limit)
        if request.sampling.json_schema is not None:
            seq.grammar = self.grammars.matcher(request.sampling.json_schema)  # GrammarError (a ValueError): refused
        if request.sampling.prompt_logprobs is not None:
            seq.prompt_logprobs = [TokenLogprob(prompt_ids[0], None)]  # nothing predicts the first token
        return seq

    def add_request(self, request: GenerationRequest, adapter_key=None) -> Sequence:
        """Validate and queue one request (engine thread)."""
        seq = self.make_sequence(request, adapter_key)
        self.scheduler.add(seq)
        return seq

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence made by `make_sequence` (engine thread)."""
        self.scheduler.add(seq)

    def fail_running(self, message: str) -> list[Sequence]:
        """After a failed step: finish every scheduled sequence (and any whose token was in
        flight) with an error, keep serving."""
        failed = list(self.scheduler.running)
        if self._in_flight is not None:
            failed += [seq for _, seq in self._in_flight.sampled if seq not in failed and not seq.is_finished]
            self._in_flight = None
        for seq in failed:
            seq.num_cached_tokens = 0  # its keys and values may never have been computed: cache none of them
            self.scheduler.abort(seq)
            seq.error = message
            self._mark_finished(seq, "error")
        return failed

    def abort(self, seq: Sequence) -> None:
        if self.scheduler.abort(seq):
            self._mark_finished(seq, "abort")

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._in_flight is not None

    def generate(self, requests: list[GenerationRequest], adapter_keys: list | None = None) -> list[GenerationResult]:
        """Run requests to completion in shared batches. `adapter_keys` (one per request)
        override `request.adapter` as the adapters' identities, e.g. (customer, version)."""
        keys = adapter_keys or [r.adapter for r in requests]
        for key in keys:
            if key is not None and self.adapters.prepare(key) == "failed":
                raise KeyError(f"unknown adapter {key!r}: {self.adapters.error(key)}")
        seqs = [self.add_request(r, k) for r, k in zip(requests, keys)]
        idle_since = None
        while not all(s.is_finished for s in seqs):
            if self.step() or self.scheduler.running:
                idle_since = None
                continue
            # nothing ran: adapters may still be loading in the background; wait a little
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > NO_PROGRESS_TIMEOUT_S:
                raise RuntimeError("no progress: the waiting requests cannot be scheduled")
            time.sleep(0.002)
        return [GenerationResult(s.text, list(s.output_ids), s.finish_reason, len(s.prompt_ids), s.output_logprobs,
                                 s.prompt_logprobs) for s in seqs]

    # -- one step ---------------------------------------------------------------------------

    def step(self) -> list[Sequence]:
        """Run one batch; returns the sequences that got a token or finished. With asynchronous
        scheduling the tokens returned are those of the step launched by the previous call."""
        out = self.scheduler.schedule()
        for seq in out.failed:
            self._mark_finished(seq, "error")
        launched = self.launch(out.chunks) if out.chunks else None
        early, self._completed_early = self._completed_early, []
        if self.async_scheduling:  # complete the step before this one; this one stays in flight
            previous, self._in_flight = self._in_flight, launched
        else:
            previous = launched
        self.last_step_idle = not out.chunks and previous is None and not early
        if previous is None:
            return list(out.failed) + early
        return list(out.failed) + early + self.complete(previous)

    def flush(self) -> list[Sequence]:
        """Complete the step in flight, if any (asynchronous scheduling), so that every sampled
        token is on the host; returns the sequences it updated."""
        previous, self._in_flight = self._in_flight, None
        return self.complete(previous) if previous is not None else []

    def run(self, chunks: list[ScheduledChunk], all_logits: frozenset[int] = frozenset()) -> torch.Tensor:
        """Logits at each chunk's last token (len(chunks), vocab); chunks whose index is in
        `all_logits` give a row for every token they feed (runner.SequenceChunk.all_logits)."""
        pending = self._in_flight.tokens if self._in_flight is not None else None
        slots = {c.seq.lora_slot for c in chunks if c.seq.lora_slot >= 0}
        return self.runner.run([
            SequenceChunk(
                token_ids=c.seq.token_slice(c.seq.num_cached_tokens, c.num_tokens),
                start_position=c.seq.num_cached_tokens,
                block_table=c.seq.block_table,
                lora_slot=c.seq.lora_slot,
                pending_row=c.seq.pending_row if c.seq.num_pending else -1,
                all_logits=i in all_logits,
            )
            for i, c in enumerate(chunks)
        ], pending_tokens=pending, lora_projections=self.pool.projections_of(slots) if slots else None)

    def launch(self, chunks: list[ScheduledChunk]) -> LaunchedStep | None:
        """Queue the forward and the sampling of the chunks; start the copy of the sampled ids
        to the host. None when no chunk completes its prompt (nothing to sample)."""
        scored = frozenset(i for i, c in enumerate(chunks) if _scores_prompt(c))
        logits = self.run(chunks, scored)
        full = logits
        if scored:  # (R, vocab) rows: every token of the scored chunks, the last of the others
            counts = [c.num_tokens if i in scored else 1 for i, c in enumerate(chunks)]
            ends = list(itertools.accumulate(counts))
            logits = full.index_select(0, torch.tensor([e - 1 for e in ends], device=full.device))
        # Only chunks that reach the end of the known tokens sample; a prefill chunk in the
        # middle of a long prompt just fills the KV cache.
        ready = [(row, c.seq) for row, c in enumerate(chunks) if c.completes_prompt]
        step_logprobs = None
        if scored or any(seq.sampling.logprobs is not None for _, seq in ready):
            step_logprobs = StepLogprobs()
            for row, seq in ready:
                if seq.sampling.logprobs is not None:
                    step_logprobs.add_sampled(seq, ends[row] - 1 if scored else row, row)
            for i in scored:
                c = chunks[i]
                step_logprobs.add_prompt(c.seq, ends[i] - c.num_tokens, c.seq.num_cached_tokens, c.num_tokens)
                c.seq.prompt_scored_to = max(c.seq.prompt_scored_to, c.seq.num_cached_tokens + c.num_tokens)
        for c in chunks:
            c.seq.num_cached_tokens += c.num_tokens
        if not ready:
            if not step_logprobs:
                return None
            step_logprobs.compute(full, None)
            return self._to_host([], None, step_logprobs)
        # Every row is sampled (rows of unfinished prompts greedily, and ignored): no gather of
        # rows with a host-made index.
        params = [_UNUSED_ROW] * len(chunks)
        seeds, steps = [0] * len(chunks), [0] * len(chunks)
        for row, seq in ready:
            params[row], seeds[row], steps[row] = seq.sampling, seq.seed, seq.num_generated
            seq.num_pending, seq.pending_row = seq.num_pending + 1, row
        constrained = [(row, seq) for row, seq in ready if seq.grammar is not None]
        if constrained:
            logits = self._mask_with_grammars(logits, constrained, keep_logits=step_logprobs is not None and not scored)
        tokens = sample(logits, params, seeds, steps)
        if step_logprobs:
            step_logprobs.compute(full, tokens)
        return self._to_host(ready, tokens, step_logprobs or None)

    def _mask_with_grammars(self, logits: torch.Tensor, constrained: list[tuple[int, Sequence]],
                            keep_logits: bool) -> torch.Tensor:
        """Mask the constrained rows' logits by their grammars. Each matcher must have taken its
        sequence's last token first: with asynchronous scheduling that token is the step in
        flight's, so that step is completed now, after this step's forward is queued (the device
        stays busy while the host reads the tokens and fills the masks), not after its sampling.
        `keep_logits`: mask a copy (the log-probabilities are of the unmasked logits)."""
        if self._in_flight is not None:
            previous, self._in_flight = self._in_flight, None
            self._completed_early += self.complete(previous)
        live = [(row, seq) for row, seq in constrained if not seq.is_finished]
        if not live:
            return logits
        if keep_logits:
            logits = logits.clone()
        mask_logits(logits, [row for row, _ in live], [seq.grammar for _, seq in live])
        return logits

    @staticmethod
    def _to_host(ready, tokens: torch.Tensor | None, step_logprobs: StepLogprobs | None) -> LaunchedStep:
        """Start the step's device -> host copy (its one copy unless logprobs were asked for),
        waited for in complete()."""
        if tokens is None or not tokens.is_cuda:
            copied = None
            if step_logprobs is not None and step_logprobs.host[0].is_cuda:
                copied = torch.cuda.Event()
                copied.record()
            return LaunchedStep(ready, tokens, tokens, copied, step_logprobs)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return LaunchedStep(ready, tokens, host, copied, step_logprobs)

    def complete(self, step: LaunchedStep) -> list[Sequence]:
        """Append a launched step's tokens, check stops and retire finished sequences. A
        sequence that ended meanwhile (aborted, or stopped at the step before) drops its token."""
        tokens = step.read_tokens()
        entries = step.logprobs.apply(tokens) if step.logprobs is not None else {}
        updated = []
        for row, seq in step.sampled:
            if seq.is_finished or seq.num_pending == 0:
                continue
            seq.num_pending -= 1
            token = tokens[row]
            seq.output_ids.append(token)
            if seq.grammar is not None and not seq.grammar.accept(token):  # cannot happen: the mask allowed it
                seq.error = "the sampled token does not fit the response format's grammar"
                self.scheduler.finish(seq)
                self._mark_finished(seq, "error")
                updated.append(seq)
                continue
            if seq.sampling.logprobs is not None:
                seq.output_logprobs = seq.output_logprobs or []
                seq.output_logprobs.append(entries[seq.seq_id])
            updated.append(seq)
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self.scheduler.finish(seq)
                self._mark_finished(seq, reason)
        return updated

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.sampling
        if token in self.eos_ids and (not params.ignore_eos or seq.grammar is not None):
            seq.output_ids.pop()  # the EOS token is not part of the answer; seq.text already is its text
            if seq.output_logprobs:
                seq.output_logprobs.pop()
            return "stop"
        keep, new = self._decode(seq)
        seq.text = seq.text[:keep] + new
        for stop in params.stop:
            # not in the previous text, so a match ends after `keep`: search only the tail
            cut = seq.text.find(stop, max(0, keep - len(stop) + 1))
            if cut >= 0:
                seq.text = seq.text[:cut]
                return "stop"
        if len(seq.prompt_ids) + len(seq.output_ids) >= seq.token_limit:  # max_tokens, or the context length
            return "length"
        return None

    def _decode(self, seq: Sequence) -> tuple[int, str]:
        """The change to seq.text from its new output ids: (characters kept, text after them)."""
        if seq.detokenizer is None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer)
        return seq.detokenizer.update(seq.output_ids)

    @staticmethod
    def _mark_finished(seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason


def _scores_prompt(chunk: ScheduledChunk) -> bool:
    """The chunk feeds prompt tokens whose log-probabilities its request wants and no step has
    computed yet (a preempted sequence's recomputation scores nothing twice)."""
    seq = chunk.seq
    return (seq.sampling.prompt_logprobs is not None and seq.num_cached_tokens < len(seq.prompt_ids) - 1
            and seq.num_cached_tokens + chunk.num_tokens > seq.prompt_scored_to)


def build_device_state(model: LlamaModel, settings: Settings
                       ) -> tuple[AdapterPool, EngineLimits, KVCache, ModelRunner]:
    """The adapter pool, the limits, the KV cache and the runner of a model on its device. Under
    tensor parallelism every rank calls this (a collective): the ranks agree on the smallest pool
    and KV cache any of them can hold, so that slots and blocks mean the same everywhere."""
    weight = model.embed_tokens.weight
    device, dtype = weight.device, weight.dtype
    select_blas_library(settings.blas_library, device)  # before any GEMM is captured
    tp = model.tp
    # the adapter pool first: on the GPU the KV cache takes what memory is left
    max_loras = settings.max_loras or _auto_lora_slots(settings, model, device)
    if tp is not None:
        max_loras = tp.smallest(max_loras)
    pool = AdapterPool(model, max_loras, settings.max_lora_rank, settings.restricted_lora_modules())
    shard = model.shard_config  # the KV heads this process holds (all of them without tensor parallelism)
    limits = _limits(settings, shard, dtype, device, max_loras, pool.num_pages)
    if tp is not None:
        limits = replace(limits, num_kv_blocks=tp.smallest(limits.num_kv_blocks))
    kv_cache = KVCache(shard.num_layers, limits.num_kv_blocks, limits.kv_block_size, shard.num_kv_heads,
                       shard.head_dim, dtype, device)
    runner = ModelRunner(model, kv_cache, device, max_num_seqs=limits.max_num_seqs,
                         max_num_batched_tokens=limits.max_num_batched_tokens, max_model_len=limits.max_model_len)
    return pool, limits, kv_cache, runner


def _async_scheduling(setting: str, device: torch.device) -> bool:
    """auto: on the GPU only (on the CPU the forward runs on the scheduling thread itself, so
    there is nothing to overlap, and a stopped sequence's extra token would cost CPU time)."""
    if setting == "auto":
        return device.type == "cuda"
    return setting == "on"


def _kv_cache_budget(settings: Settings, device: torch.device) -> int:
    """Bytes for the KV cache: 1 GiB on the CPU; on the GPU what is free after the model and
    the adapter pool, less the share `gpu_memory_utilization` keeps back for activations."""
    if device.type != "cuda":
        return CPU_KV_CACHE_BYTES
    free, total = torch.cuda.mem_get_info(device)
    return max(0, int(free - (1 - settings.gpu_memory_utilization) * total))


def default_max_num_seqs(device: torch.device) -> int:
    """Sequences running at once when the settings leave it open: the GPU's decode step is
    bound by reading the weights, so a large batch is almost free; the CPU's is not."""
    return 256 if device.type == "cuda" else 32


def _auto_lora_slots(settings: Settings, model: LlamaModel, device: torch.device) -> int:
    """Adapters of the largest rank the pool holds when the settings leave it open: on the GPU
    as many as `lora_memory_fraction` of its memory holds, between 8 and MAX_AUTO_LORA_SLOTS; on
    the CPU 8. Smaller adapters take fewer pages (server/lora/pool.py): at the default max rank
    64, four times as many rank-16 ones fit (S-LoRA-style: hundreds resident)."""
    if device.type != "cuda":
        return 8
    projections = pool_projections(model, settings.restricted_lora_modules())
    per_slot = sum(
        settings.max_lora_rank * (proj.in_features * len(proj.out_sizes) + sum(proj.out_sizes))
        for _, _, proj in projections
    ) * model.embed_tokens.weight.element_size()
    # DoRA factors: a float32 per output channel for each of the adapter's pages
    pages = -(-settings.max_lora_rank // min(PAGE_RANK, settings.max_lora_rank))
    per_slot += pages * 4 * sum(sum(proj.out_sizes) for _, _, proj in projections)
    total = torch.cuda.get_device_properties(device).total_memory
    return max(8, min(MAX_AUTO_LORA_SLOTS, int(settings.lora_memory_fraction * total) // per_slot))


def _limits(settings: Settings, cfg, dtype: torch.dtype, device: torch.device, max_loras: int,
            lora_pages: int) -> EngineLimits:
    max_model_len = settings.max_model_len or min(cfg.max_position_embeddings, 8192)
    max_num_seqs = settings.max_num_seqs or default_max_num_seqs(device)
    num_blocks = settings.num_kv_blocks
    if num_blocks == 0:
        per_block = KVCache.bytes_per_block(cfg.num_layers, settings.kv_block_size, cfg.num_kv_heads, cfg.head_dim, dtype)
        wanted = max_num_seqs * -(-max_model_len // settings.kv_block_size)
        num_blocks = max(1, min(wanted, _kv_cache_budget(settings, device) // per_block))
    return EngineLimits(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max(settings.max_num_batched_tokens, max_num_seqs),
        max_model_len=max_model_len,
        num_kv_blocks=num_blocks,
        kv_block_size=settings.kv_block_size,
        max_loras=max_loras,
        max_lora_rank=settings.max_lora_rank,
        lora_pages=lora_pages,
    )


def _eos_ids(tokenizer, cfg) -> set[int]:
    ids = set(cfg.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
