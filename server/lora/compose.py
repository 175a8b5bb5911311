"""Compose stored LoRA adapters into a new one: task arithmetic, interpolation, negation.

A recipe names source adapters, a weight per source (negative weights subtract) and a method,
with peft's `add_weighted_adapter` semantics for that method:

- `cat` (exact): per module, the composed delta is sum_i w_i s_i B_i A_i, stored as A = the
  rows w_i s_i A_i stacked, B = the columns B_i side by side, scale 1. A module's rank is the
  sum of the ranks of the sources that target it (peft pads every module to the sum of all the
  sources' largest ranks with zeros; the product is the same, ours is smaller).
- `svd`: the same weighted sum, refactored to `rank` (default: the largest source rank, as in
  peft) by its truncated SVD: B = U_k diag(S_k), A = Vh_k. The SVD is taken of the small core of
  the stacked factors (QR of B and A^T, then an SVD of r x r, r the sum of ranks), which has the
  singular values and vectors of the full out x in delta without forming it; a module whose
  delta has rank below `rank` keeps that rank (the rest of peft's factors would be zeros).

Modules targeted by only some sources compose those sources only, as in peft. The result is a
plain peft LoRA adapter (`adapter_config.json` + `adapter_model.safetensors` bytes) whose config
names every module in full, with `rank_pattern`/`alpha_pattern` giving each its rank and scale
1; it is then validated and stored like an upload, with the recipe as its provenance.

Refused (RecipeError, naming the field): no sources, a weight that is not a finite number, an
unknown method, `rank` with `cat`, a rank outside 1..max_rank, a composed rank above max_rank
(use `svd`), DoRA sources (a magnitude vector has no weighted sum that peft defines).
Where peft differs on purpose: a first source with `use_rslora` makes peft's result scale by
sqrt(r) again (its config is copied); ours is always the weighted sum itself.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import torch
from safetensors.torch import save

from server.lora.adapter import LoRAAdapter, ModuleKey
from server.lora.peft import module_name

METHODS = ("cat", "svd")
MAX_SOURCES = 16
_KEY_PREFIX = "base_model.model."


class RecipeError(ValueError):
    """The recipe cannot be composed; `field` names the part of the request at fault."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class SourceForbidden(PermissionError):
    """A composition names a source adapter its customer may not read; `field` names it."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Source:
    customer_id: str
    weight: float


@dataclass(frozen=True)
class Recipe:
    sources: tuple[Source, ...]
    method: str
    rank: int | None = None  # svd only; None = the largest source rank

    def check(self, max_rank: int) -> None:
        """Everything that can be checked before the sources are read."""
        if not self.sources:
            raise RecipeError("a composition needs at least one source", "sources")
        if len(self.sources) > MAX_SOURCES:
            raise RecipeError(f"at most {MAX_SOURCES} sources, got {len(self.sources)}", "sources")
        for i, source in enumerate(self.sources):
            weight = source.weight
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise RecipeError(f"sources[{i}].weight must be a finite number, got {weight!r}",
                                  f"sources[{i}].weight")
        if self.method not in METHODS:
            raise RecipeError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}", "method")
        if self.rank is not None:
            if self.method != "svd":
                raise RecipeError("rank applies to method svd only (cat's rank is the sum of the sources' ranks)",
                                  "rank")
            if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 1 <= self.rank <= max_rank:
                raise RecipeError(f"rank must be an integer in 1..{max_rank} (this server's max_lora_rank), "
                                  f"got {self.rank!r}", "rank")


def compose(recipe: Recipe, adapters: list[LoRAAdapter], *, max_rank: int) -> tuple[bytes, bytes]:
    """The composed adapter's (adapter_config.json, adapter_model.safetensors) bytes; `adapters`
    are the recipe's sources in order (any dtype; composed in float32)."""
    recipe.check(max_rank)
    for source, adapter in zip(recipe.sources, adapters, strict=True):
        if adapter.use_dora:
            raise RecipeError(f"source {source.customer_id!r} is a DoRA adapter, which cannot be composed "
                              "(merge it with `loraplex merge` instead)", "sources")
    targets = sorted({key for adapter in adapters for key in adapter.modules})
    svd_rank = recipe.rank or max(adapter.rank for adapter in adapters)
    tensors, ranks = {}, {}
    for key in targets:
        parts = [(source.weight * m.scale * m.lora_b.float(), m.lora_a.float())
                 for source, adapter in zip(recipe.sources, adapters) if (m := adapter.modules.get(key))]
        b = torch.cat([b for b, _ in parts], dim=1)  # (out, sum of ranks)
        a = torch.cat([a for _, a in parts], dim=0)  # (sum of ranks, in)
        if recipe.method == "svd":
            b, a = _truncated_svd(b, a, svd_rank)
        elif b.shape[1] > max_rank:
            raise RecipeError(f"the cat composition of {module_name(*key)} has rank {b.shape[1]}, over this "
                              f"server's max_lora_rank {max_rank}; use method svd with a rank", "sources")
        name = module_name(*key)
        tensors[f"{_KEY_PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{_KEY_PREFIX}{name}.lora_B.weight"] = b.contiguous()
        ranks[key] = a.shape[0]
    return _config_bytes(ranks), save(tensors)


def _truncated_svd(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B', A') with B' A' the best rank-`rank` approximation of B A (its top singular triplets),
    from the r x r core: B = Qb Rb, A^T = Qa Ra, B A = Qb (Rb Ra^T) Qa^T."""
    qb, rb = torch.linalg.qr(b)  # (out, r), (r, r)
    qa, ra = torch.linalg.qr(a.T)  # (in, r), (r, r)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    k = min(rank, s.shape[0])
    return (qb @ u[:, :k]) * s[:k], vh[:k] @ qa.T


def _config_bytes(ranks: dict[ModuleKey, int]) -> bytes:
    """A peft LoRA config naming each module in full; rank_pattern gives each its rank and
    alpha_pattern the same number, so every scale is 1 (the weights carry the scales)."""
    r = max(ranks.values())
    patterns = {re.escape(module_name(*key)): rank for key, rank in ranks.items() if rank != r}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r, "use_rslora": False,
        "use_dora": False, "bias": "none", "target_modules": sorted(module_name(*key) for key in ranks),
        "rank_pattern": patterns, "alpha_pattern": dict(patterns), "lora_dropout": 0.0,
    }
    return json.dumps(config, indent=1).encode()
