"""Next-token choice for a whole batch on the logits' device: greedy, or temperature with
top-k / top-p, reproducible per sequence.

One code path for the CPU and the GPU, with no host round trip: the caller reads the chosen
tokens back once per step. Random draws come from a counter-based hash of (sequence seed,
output position, token id), not from a stateful generator, so a sequence's samples depend
only on its own seed and logits: not on what else shares the batch, not on the device, and
not on preemption (a recomputed sequence draws the same noise at the same position).

Drawing: with probabilities p (after temperature, top-k and top-p) and noise u ~ U(0, 1) per
token, the choice is argmax_v p_v / (-log u_v), the exponential race, which picks v with
probability p_v.
"""

from __future__ import annotations

import torch

from server.engine.request import SamplingParams

_MASK32 = 0xFFFFFFFF
_BELOW_ONE = 1.0 - 2.0**-24  # the largest float32 below 1


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], steps: list[int]) -> torch.Tensor:
    """logits (B, vocab) fp32 -> (B,) int64 token ids on the same device.

    `seeds[i]` is row i's sequence seed, `steps[i]` the index of the token being drawn."""
    chosen = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return chosen
    device = logits.device
    picked = [params[i] for i in rows]
    floats = _to_device(torch.tensor([[p.temperature, p.top_p] for p in picked], dtype=torch.float32), device)
    ints = _to_device(torch.tensor([[i, p.top_k, seeds[i], steps[i]] for i, p in zip(rows, picked)],
                                   dtype=torch.int64), device)
    index, top_k, seed, step = ints.unbind(1)
    sub = logits.index_select(0, index) / floats[:, :1]  # (n, vocab)
    if any(p.top_k for p in picked) or any(p.top_p < 1 for p in picked):
        sub = _top_k_top_p(sub, top_k, floats[:, 1])
    probs = sub.softmax(-1)
    noise = uniform_noise(seed, step, sub.shape[-1])  # (n, vocab)
    drawn = (probs / -noise.log()).argmax(dim=-1)
    return chosen.index_copy(0, index, drawn)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)  # never waits for the queued step


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (-inf) what top-k (0 = off; ties with the k-th are kept) and then top-p leave out:
    a token is dropped once the mass of the more likely tokens before it reaches top_p."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (n, vocab)
    kth = sorted_logits.gather(1, (top_k.clamp(1, vocab) - 1)[:, None])  # (n, 1)
    cut = (top_k[:, None] > 0) & (sorted_logits < kth)
    sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
    probs = sorted_logits.softmax(-1)
    drop = (probs.cumsum(-1) - probs) >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def uniform_noise(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """(n, vocab) float32 in (0, 1): a hash of (seed, step, token id), identical on every device.

    Integer arithmetic stays below 2**63 (32-bit products are split in 16-bit halves), so no
    signed overflow is relied on."""
    row = _mix32((seed & _MASK32) ^ _mix32(((seed >> 32) & _MASK32) ^ _mix32(step & _MASK32)))  # (n,)
    token = _mul32(torch.arange(vocab, dtype=torch.int64, device=seed.device), 0x9E3779B1)  # (vocab,)
    bits = _mix32(row[:, None] ^ token[None, :])  # (n, vocab) 32 bits
    # the top value, (2**24 - 0.5) / 2**24, rounds to 1.0 in float32: -log(1) = 0 would make a token of
    # probability 0 (masked by top-k/top-p or a grammar) draw 0 / 0 = NaN, which argmax picks
    return (((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))).clamp_(max=_BELOW_ONE)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 0 <= x < 2**32, without overflowing int64."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xor-shift-multiply), well mixing in every input bit."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)
