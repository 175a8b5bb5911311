"""Log-probabilities of sampled and prompt tokens, for the requests that ask for them.

Owns: which rows of a step's logits need log-probabilities, computing them on the device (one
log-softmax, gather and top-k over those rows only), their copy to the host with the step's
sampled tokens, and turning them into `TokenLogprob` entries on the sequences when the step
completes. The logits are the ones the sampler sees: after the adapter, before temperature,
top-k/top-p and any grammar mask (the model's own distribution, as OpenAI and vLLM report it).

A step in which no request asks for log-probabilities never builds a `StepLogprobs`: nothing
here runs, and the step's one device -> host copy stays its sampled token ids.

Prompt log-probabilities (`echo` with `logprobs`): the token at position j is scored by the
logits at position j - 1, so a prompt chunk that asks for them has the runner return a row for
each of its tokens (`SequenceChunk.all_logits`); a chunk that does not end the prompt scores
the next prompt token with its last row, one that ends it leaves that row to the sampler.
Entries are appended by position, once: a preempted sequence recomputing its prompt adds none twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from server.engine.request import TokenLogprob
from server.engine.sequence import Sequence

# JSON has no -inf; what a log-probability of exactly 0 probability reads as (vLLM does the same)
MIN_LOGPROB = -9999.0


@dataclass
class _Span:
    seq: Sequence
    position: int  # prompt: position of the first token scored; -1: the token sampled this step
    start: int  # first of its rows among the step's selected rows
    targets: list[int]  # prompt: the token ids scored; sampled: [row of the step's sampled tokens]
    num_top: int


@dataclass
class StepLogprobs:
    """One step's requested log-probabilities: built in `launch`, read in `complete`.

    Rows are selected from the step's logits in the runner's row order (`row_of_chunk`): the
    sampled rows' first, then the prompt rows."""

    sampled: list[_Span] = field(default_factory=list)
    prompt: list[_Span] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # rows of the step's logits, in span order
    host: tuple[torch.Tensor, ...] = ()  # (chosen (M,), top values (M, K), top ids (M, K)) on the host

    def add_sampled(self, seq: Sequence, logits_row: int, sampled_row: int) -> None:
        self.sampled.append(_Span(seq, -1, len(self.rows), [sampled_row], seq.sampling.logprobs))
        self.rows.append(logits_row)

    def add_prompt(self, seq: Sequence, first_logits_row: int, start: int, num_tokens: int) -> None:
        """A chunk of `num_tokens` prompt tokens from position `start`, its rows from
        `first_logits_row`: row i scores the token at start + i + 1 while that is a prompt token."""
        last = min(start + num_tokens, len(seq.prompt_ids) - 1)  # the last position scored
        targets = seq.prompt_ids[start + 1 : last + 1]
        if targets:
            self.prompt.append(_Span(seq, start + 1, len(self.rows), targets, seq.sampling.prompt_logprobs))
            self.rows.extend(range(first_logits_row, first_logits_row + len(targets)))

    def __bool__(self) -> bool:
        return bool(self.rows)

    def compute(self, logits: torch.Tensor, sampled_tokens: torch.Tensor) -> None:
        """From the step's logits (R, vocab) fp32 and its sampled ids (B,) on the device: starts
        the copy of the chosen tokens' log-probabilities and the top alternatives to the host."""
        device = logits.device
        k = max(span.num_top for span in self.sampled + self.prompt)
        selected = logits.index_select(0, _index(self.rows, device))  # (M, vocab)
        parts = []
        if self.sampled:
            parts.append(sampled_tokens.index_select(0, _index([s.targets[0] for s in self.sampled], device)))
        if self.prompt:
            parts.append(_index([t for span in self.prompt for t in span.targets], device))
        targets = torch.cat(parts) if len(parts) > 1 else parts[0]  # (M,)
        logprobs = selected.log_softmax(-1)  # (M, vocab)
        chosen = logprobs.gather(1, targets[:, None])[:, 0]  # (M,)
        top_values, top_ids = logprobs.topk(k, dim=-1)  # (M, k), most likely first
        if logits.is_cuda:  # pinned copies, waited for with the step's tokens
            self.host = tuple(_to_host_async(t) for t in (chosen, top_values, top_ids))
        else:
            self.host = (chosen, top_values, top_ids)

    def apply(self, tokens: list[int]) -> dict[int, TokenLogprob]:
        """After the copy (`tokens`: the step's sampled ids on the host): the prompt entries go
        onto their sequences, by position and once; returns the sampled tokens' entries by
        sequence id, for `complete` to append with their tokens."""
        chosen, top_values, top_ids = (t.tolist() for t in self.host)
        sampled = {}
        for span in self.sampled:
            r, n = span.start, span.num_top
            sampled[span.seq.seq_id] = _entry(tokens[span.targets[0]], chosen[r], top_values[r][:n], top_ids[r][:n])
        for span in self.prompt:
            seq, n = span.seq, span.num_top  # seq.prompt_logprobs starts as [the first token's]
            for i, token in enumerate(span.targets):
                if span.position + i == len(seq.prompt_logprobs):
                    r = span.start + i
                    seq.prompt_logprobs.append(_entry(token, chosen[r], top_values[r][:n], top_ids[r][:n]))
        return sampled


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.int64)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def _entry(token_id: int, logprob: float, top_values: list[float], top_ids: list[int]) -> TokenLogprob:
    return TokenLogprob(token_id, max(logprob, MIN_LOGPROB),
                        tuple((i, max(v, MIN_LOGPROB)) for i, v in zip(top_ids, top_values)))


def _to_host_async(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host
