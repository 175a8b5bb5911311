"""Next-token choice per sequence: greedy, or temperature with top-k / top-p, seedable.

Each seeded request owns a torch.Generator, so its samples do not depend on what else
shares the batch.
"""

from __future__ import annotations

import torch

from server.engine.request import SamplingParams


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """logits (B, vocab) fp32 -> one token id per row."""
    greedy_ids = logits.argmax(dim=-1)
    tokens = greedy_ids.tolist()
    for row, (p, gen) in enumerate(zip(params, generators)):
        if p.greedy:
            continue
        probs = _filtered_probs(logits[row], p)
        tokens[row] = int(torch.multinomial(probs, 1, generator=gen).item())
    return tokens


def _filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the mass of the more likely tokens before it reaches top_p
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    return logits.softmax(-1)
