"""What a caller asks the engine for, and what it gets back. Plain data, no tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # most likely alternatives per token a request may ask for


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the most likely alternatives at its position."""

    token_id: int
    logprob: float | None  # None: the prompt's first token, which nothing predicts
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # log-probabilities (server/engine/logprobs.py), of the logits the sampler sees (after the
    # adapter, before temperature): each output token's and its `logprobs` most likely
    # alternatives; `prompt_logprobs`: the same for every prompt token (the prompt is then
    # computed in full, never taken from the prefix cache). None = not wanted (no cost).
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # structured output (server/engine/grammar.py): the answer is JSON fitting this JSON schema (text);
    # '{"type": "object"}' for any JSON object. EOS ends such a sequence even with ignore_eos.
    json_schema: str | None = None

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in 0..{MAX_LOGPROBS}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str | list[int]  # text, or token ids used as they are
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None  # a registered adapter id; None = base model
    chat: bool = False  # wrap a text prompt as one user message in the model's chat template
    deadline: float | None = None  # time.monotonic() by which it must end; past it, finish_reason "timeout"


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when asked for
    prompt_logprobs: list[TokenLogprob] | None = None  # one per prompt token, when asked for
