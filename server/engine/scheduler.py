"""Continuous batching: which sequences run in the next step, and how many tokens each feeds.

Plain Python — no torch, no HTTP — so tests drive it with a fake runner. Each step:

1. Running sequences go first, oldest first: a decode feeds one token, a sequence still in
   its prompt feeds the next chunk that fits the step's token budget (chunked prefill); one
   whose last token is still on its way from the device runs no more. When
   KV blocks run out, the newest running sequence is preempted (its blocks freed, to be
   recomputed later) — never a crash.
2. Waiting sequences are admitted round-robin across tenants (one per tenant per round, so a
   tenant flooding the queue cannot starve the others), while the token budget, the running
   cap, KV blocks and adapter slots allow. A sequence whose adapter is still loading stays
   waiting without holding up other tenants; one whose adapter failed to load is failed.
   With prefix caching, an admitted sequence first takes the cached blocks of its longest known
   prefix under its adapter's identity (never its last token: that one's logits are needed)
   and feeds only what follows; a sequence that wants its prompt's log-probabilities takes none.
3. Blocks a sequence has filled with computed keys and values are registered in the cache
   (each step, and when it ends or is preempted): from the next step on others find them.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Hashable, Protocol

from server.engine.block_manager import BlockAllocator, block_hash
from server.engine.sequence import Sequence, SequenceStatus


class AdapterResidency(Protocol):
    """What the scheduler needs to know about adapters (the tiered cache implements it)."""

    def prepare(self, key: Hashable) -> str:
        """Start loading if needed; returns "ready" (can be pinned now), "loading" or "failed"."""

    def error(self, key: Hashable) -> str: ...

    def can_pin(self, key: Hashable) -> bool:
        """A device slot holds the adapter or can be freed for it."""

    def pin(self, key: Hashable) -> int:
        """Make it resident (if it is not) and count one more user; returns its slot."""

    def unpin(self, key: Hashable) -> None: ...

    def identity(self, key: Hashable) -> Hashable:
        """What names the adapter's weights for the prefix cache: equal only for the same
        weights (a replaced adapter gets a new identity). Optional: the key itself by default."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens fed this step, starting at seq.num_cached_tokens

    @property
    def completes_prompt(self) -> bool:
        """After this chunk every known token is cached, so its logits give the next token."""
        return self.seq.num_cached_tokens + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)  # adapter failed to load: finished with an error

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockAllocator, adapters: AdapterResidency):
        self.config = config
        self.blocks = blocks
        self.adapters = adapters
        self.waiting: OrderedDict[str, deque[Sequence]] = OrderedDict()  # tenant -> FIFO, in turn order
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # -- queue ----------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    def has_work(self) -> bool:
        return bool(self.running) or self.num_waiting > 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.setdefault(seq.tenant, deque()).append(seq)

    def abort(self, seq: Sequence) -> bool:
        """Drop a sequence wherever it is, releasing its blocks and adapter pin at once."""
        if seq in self.running:
            self.running.remove(seq)
            self._release(seq)
        else:
            queue = self.waiting.get(seq.tenant)
            if queue is None or seq not in queue:
                return False
            queue.remove(seq)
            if not queue:
                del self.waiting[seq.tenant]
        return True

    def finish(self, seq: Sequence) -> None:
        """A sequence is done (running, or preempted while its last token was on its way):
        release what it holds."""
        self.abort(seq)

    # -- one step -------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        self._admit_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            self._cache_computed_blocks(seq)
            if seq.awaits_last_token:  # asynchronous scheduling: it ends when that token arrives
                i += 1
                continue
            n = min(seq.num_tokens - seq.num_cached_tokens, budget)
            need = self.blocks.blocks_needed(seq.num_cached_tokens + n, len(seq.block_table))
            while not self.blocks.can_allocate(need) and self.running[-1] is not seq:
                self._preempt(self.running[-1])
            if not self.blocks.can_allocate(need):
                self._preempt(seq)  # alone it does not fit: it waits for blocks to come back
                break
            seq.block_table += self.blocks.allocate(need)
            out.chunks.append(ScheduledChunk(seq, n))
            budget -= n
            i += 1
        return budget

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        progress = True
        while progress and budget > 0 and len(self.running) < self.config.max_num_seqs:
            progress = False
            for tenant in list(self.waiting):  # one round: at most one admission per tenant
                if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                    return
                queue = self.waiting[tenant]
                seq = queue[0]
                if seq.awaits_last_token:  # preempted just now, its last token on its way
                    continue
                if seq.adapter_key is not None:
                    state = self.adapters.prepare(seq.adapter_key)
                    if state == "failed":
                        queue.popleft()
                        seq.error = self.adapters.error(seq.adapter_key)
                        out.failed.append(seq)
                        self._drop_empty(tenant)
                        progress = True
                        continue
                    if state != "ready" or not self.adapters.can_pin(seq.adapter_key):
                        continue  # this tenant waits; the others go on
                hits = self._cached_prefix(seq)
                cached = len(hits) * self.blocks.block_size
                n = min(seq.num_tokens - cached, budget)
                need = self.blocks.blocks_needed(cached + n, len(hits))
                if not self.blocks.can_allocate(need + self.blocks.num_unreferenced(hits)):
                    return  # running sequences will free blocks; nobody jumps the queue for them
                queue.popleft()
                self._rotate(tenant)
                progress = True
                if seq.adapter_key is not None:
                    try:
                        seq.lora_slot = self.adapters.pin(seq.adapter_key)
                    except Exception as exc:  # e.g. the file went bad since it was checked
                        seq.error = str(exc)
                        out.failed.append(seq)
                        continue
                if self.blocks.prefix_caching and seq.sampling.prompt_logprobs is None:
                    self.blocks.count_lookup(seq.num_tokens, cached)
                seq.block_table = self.blocks.take(hits) + self.blocks.allocate(need)
                seq.num_cached_tokens, seq.num_cached_blocks = cached, len(hits)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                out.chunks.append(ScheduledChunk(seq, n))
                budget -= n

    def _rotate(self, tenant: str) -> None:
        queue = self.waiting.pop(tenant)
        if queue:
            self.waiting[tenant] = queue  # to the back of the turn order

    def _drop_empty(self, tenant: str) -> None:
        if tenant in self.waiting and not self.waiting[tenant]:
            del self.waiting[tenant]

    def _preempt(self, seq: Sequence) -> None:
        """Recompute-style: free its KV blocks; it rejoins the front of its tenant's queue."""
        self.num_preemptions += 1
        self.running.remove(seq)
        self._release(seq)
        seq.num_cached_tokens = 0
        seq.status = SequenceStatus.WAITING
        queue = self.waiting.setdefault(seq.tenant, deque())
        queue.appendleft(seq)
        self.waiting.move_to_end(seq.tenant, last=False)

    # -- prefix caching -------------------------------------------------------------------

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks of the longest prefix of the sequence's known tokens, short of its
        last token, under its adapter's identity (and hashes its full blocks for later)."""
        if not self.blocks.prefix_caching:
            return []
        namespace = None
        if seq.adapter_key is not None:
            identity = getattr(self.adapters, "identity", None)
            namespace = identity(seq.adapter_key) if identity is not None else seq.adapter_key
        if namespace != seq.cache_namespace:  # e.g. its adapter was replaced while it waited, preempted
            seq.cache_namespace, seq.block_hashes = namespace, []
        if seq.sampling.prompt_logprobs is not None:  # every prompt position's logits are wanted
            return []
        self._hash_blocks(seq, seq.num_known_tokens // self.blocks.block_size)
        usable = (min(seq.num_known_tokens, seq.num_tokens - 1)) // self.blocks.block_size
        return self.blocks.match_prefix(seq.block_hashes[:usable])

    def _hash_blocks(self, seq: Sequence, num_blocks: int) -> None:
        size, hashes = self.blocks.block_size, seq.block_hashes
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(block_hash(hashes[-1] if hashes else None, seq.cache_namespace,
                                     seq.token_slice(i * size, size)))

    def _cache_computed_blocks(self, seq: Sequence) -> None:
        """Register the sequence's blocks that are full of computed keys and values of known tokens."""
        if not self.blocks.prefix_caching:
            return
        full = min(seq.num_cached_tokens, seq.num_known_tokens) // self.blocks.block_size
        if full <= seq.num_cached_blocks:
            return
        self._hash_blocks(seq, full)
        for i in range(seq.num_cached_blocks, full):
            self.blocks.cache(seq.block_table[i], seq.block_hashes[i])
        seq.num_cached_blocks = full

    def _release(self, seq: Sequence) -> None:
        self._cache_computed_blocks(seq)
        seq.num_cached_blocks = 0
        self.blocks.free(seq.block_table)
        seq.block_table = []
        if seq.adapter_key is not None and seq.lora_slot >= 0:
            self.adapters.unpin(seq.adapter_key)
        seq.lora_slot = -1
