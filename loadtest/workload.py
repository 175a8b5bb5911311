"""What a load-generator run sends: when, for which tenant, and how long a prompt and completion.

Plain Python, deterministic from one seed: request n of a run is the same in every worker
process and in every rerun, so workers split the requests by number without talking to each
other, and two runs that differ in one setting (the rate, the number of tenants) send the
same prompts otherwise. Tenants are drawn by popularity, uniform or Zipf(alpha) over the
tenant list (rank k weighs 1 / k^alpha: S-LoRA's skewed workload at alpha = 1); lengths are
fixed or uniform over a closed range (S-LoRA's synthetic workload: both in [8, 512]).
Open-loop arrivals are a Poisson process: exponential gaps at the given rate.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from itertools import accumulate


@dataclass(frozen=True)
class Lengths:
    """A token count: fixed (lo == hi) or uniform over [lo, hi]."""

    lo: int
    hi: int

    @classmethod
    def parse(cls, text: str) -> "Lengths":
        """"128" or "8-512"."""
        try:
            lo, _, hi = text.partition("-")
            lengths = cls(int(lo), int(hi or lo))
        except ValueError:
            raise ValueError(f"a length is N or LO-HI (token counts), not {text!r}") from None
        if not 1 <= lengths.lo <= lengths.hi:
            raise ValueError(f"a length range needs 1 <= LO <= HI, not {text!r}")
        return lengths

    def draw(self, rng: random.Random) -> int:
        return self.lo if self.lo == self.hi else rng.randint(self.lo, self.hi)

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"


@dataclass(frozen=True)
class Popularity:
    """How often each tenant is picked: uniform, or Zipf with exponent alpha by list position."""

    kind: str  # "uniform" | "zipf"
    alpha: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "Popularity":
        """"uniform", "zipf" (alpha 1) or "zipf:ALPHA"."""
        kind, _, alpha = text.partition(":")
        if kind == "uniform" and not alpha:
            return cls("uniform", 0.0)
        if kind == "zipf":
            try:
                value = float(alpha) if alpha else 1.0
            except ValueError:
                value = -1.0
            if value > 0:
                return cls("zipf", value)
        raise ValueError(f"popularity is uniform, zipf or zipf:ALPHA (ALPHA > 0), not {text!r}")

    def weights(self, n: int) -> list[float]:
        if self.kind == "uniform":
            return [1.0] * n
        return [1.0 / (k ** self.alpha) for k in range(1, n + 1)]

    def __str__(self) -> str:
        return "uniform" if self.kind == "uniform" else f"zipf:{self.alpha:g}"


@dataclass(frozen=True)
class PlannedRequest:
    number: int
    tenant: str | None  # None: the base model
    prompt: list[int]  # token ids
    max_tokens: int


@dataclass(frozen=True)
class Workload:
    tenants: tuple[str, ...]  # () = every request to the base model
    popularity: Popularity
    prompt_tokens: Lengths
    output_tokens: Lengths
    token_range: tuple[int, int]  # prompt ids are drawn from [lo, hi)
    seed: int = 0

    def __post_init__(self) -> None:
        cumulative = list(accumulate(self.popularity.weights(len(self.tenants))))
        object.__setattr__(self, "_cumulative", cumulative)

    def request(self, number: int) -> PlannedRequest:
        """Request `number` of the run (the same in every process)."""
        rng = random.Random(f"{self.seed}/{number}")
        tenant = None
        if self.tenants:
            cumulative = self._cumulative  # type: ignore[attr-defined]
            tenant = self.tenants[bisect.bisect_right(cumulative, rng.random() * cumulative[-1])]
        prompt_len = self.prompt_tokens.draw(rng)
        max_tokens = self.output_tokens.draw(rng)
        prompt = [rng.randrange(*self.token_range) for _ in range(prompt_len)]
        return PlannedRequest(number, tenant, prompt, max_tokens)

    def describe(self) -> dict:
        return {"tenants": len(self.tenants), "popularity": str(self.popularity),
                "prompt_tokens": str(self.prompt_tokens), "output_tokens": str(self.output_tokens),
                "token_range": list(self.token_range), "seed": self.seed}


def poisson_arrivals(rate: float, duration_s: float, seed: int) -> list[float]:
    """Send times (seconds from the start) of a Poisson process of `rate` requests a second."""
    if rate <= 0:
        raise ValueError("the request rate must be > 0")
    rng = random.Random(f"{seed}/arrivals")
    times, t = [], rng.expovariate(rate)
    while t < duration_s:
        times.append(t)
        t += rng.expovariate(rate)
    return times
