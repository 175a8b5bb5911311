"""One request's life in the engine: its tokens, KV blocks, adapter and finish state."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Hashable

from server.engine.request import GenerationRequest

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    prompt_ids: list[int]
    seed: int = 0  # sampling seed: the request's, else drawn at random (see server/engine/sampler.py)
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # tokens whose keys/values are in the KV cache
    # Asynchronous scheduling (server/engine/engine.py): tokens the device has sampled whose ids
    # have not reached the host yet (at most 2: step N's, and step N+1's once launched). They count
    # in num_tokens, so the next step can be scheduled before they arrive; that step reads the
    # last one on the device, from `pending_row` of the step that sampled it.
    num_pending: int = 0
    pending_row: int = -1
    token_limit: int = 1 << 62  # prompt + output tokens at which the sequence ends with "length"
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    # decode(output_ids) so far (ending in U+FFFD while a character is incomplete), truncated
    # at a stop string when one matched
    text: str = ""
    detokenizer: object = None  # IncrementalDetokenizer that keeps `text`, made by the engine at the first token
    adapter_key: Hashable | None = None  # identity of the adapter's weights, None = base model
    # Prefix caching (server/engine/block_manager.py): the namespace its blocks are hashed under (the
    # adapter's identity, set at admission), the hashes of its full blocks of known tokens so far,
    # and how many of its blocks are registered in the cache
    cache_namespace: Hashable | None = None
    block_hashes: list = field(default_factory=list)
    num_cached_blocks: int = 0
    lora_slot: int = -1  # device slot while running with an adapter
    error: str | None = None  # why it finished abnormally (e.g. its adapter failed to load)
    # log-probabilities, when the request asks for them (server/engine/logprobs.py)
    output_logprobs: list | None = None  # TokenLogprob per output_ids entry
    prompt_logprobs: list | None = None  # TokenLogprob per prompt token scored so far (the first: None)
    prompt_scored_to: int = 0
    grammar: object = None  # grammar.Matcher of a structured output, following its accepted tokens  # prompt positions whose logits a launched step computes (chunks ask while below)

    @property
    def tenant(self) -> str:
        """Fairness is per tenant; the base model's users share one turn."""
        return self.request.adapter or ""

    @property
    def sampling(self):
        return self.request.sampling

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        """Prompt, output and pending tokens."""
        return len(self.prompt_ids) + len(self.output_ids) + self.num_pending

    @property
    def num_known_tokens(self) -> int:
        """Prompt and output tokens whose ids are on the host (pending ones excluded)."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_generated(self) -> int:
        """Output tokens drawn so far, the pending one included (the index of the next draw)."""
        return len(self.output_ids) + self.num_pending

    @property
    def awaits_last_token(self) -> bool:
        """Its pending token is its last (length limit): nothing more to run for it."""
        return self.num_pending > 0 and self.num_tokens >= self.token_limit

    def token_slice(self, start: int, count: int) -> list[int]:
        """all_ids[start:start + count] without concatenating prompt and output (every step);
        a pending token in the range reads as 0 (the step takes it from the device)."""
        known = len(self.prompt_ids) + len(self.output_ids)
        if start + count > known:
            return self.token_slice(start, known - start) + [0] * (start + count - known)
        num_prompt = len(self.prompt_ids)
        if start >= num_prompt:
            return self.output_ids[start - num_prompt : start - num_prompt + count]
        if start + count <= num_prompt:
            return self.prompt_ids[start : start + count]
        return self.all_ids[start : start + count]

    @property
    def uncached_ids(self) -> list[int]:
        """Tokens still to feed: the prompt (or all tokens after preemption), else the last output."""
        return self.all_ids[self.num_cached_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
