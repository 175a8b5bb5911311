"""Structured outputs: the grammars that constrain a sequence's tokens to JSON (any object, or
one that fits a JSON schema), through xgrammar.

Owns: compiling a request's JSON schema once (xgrammar's compiler caches compiled grammars by
schema, within `CACHE_BYTES`), refusing one it cannot compile with a `GrammarError` (a
ValueError: the API answers 400 with xgrammar's reason), one matcher per constrained sequence
that follows its accepted tokens, and the per-step token masks: a bitmask row per constrained
row of the step, filled on the host, copied to the device once, applied to those rows' logits
before sampling (unpacked by torch ops on the device). Unconstrained rows of the same
step are untouched; a step without a constrained sequence does none of this.

Why xgrammar: of the three well-kept engines, it filled 64 matchers' masks for a nested JSON
schema on SmolLM2's 49k vocabulary in a median 0.27 ms per step on one CPU core, against
llguidance's 1.1 ms (outlines-core was not measured: it builds a whole index per schema up front);
vLLM and SGLang use it by default.

Whitespace: generated JSON is compact-ish (", " and ": " separators, no newlines), so a small
model cannot loop on whitespace; any object is the schema {"type": "object"}.
"""

from __future__ import annotations

import json
import re
import threading

import torch

CACHE_BYTES = 256 << 20  # compiled grammars kept (xgrammar's cache), so a repeated schema compiles once
MAX_SCHEMA_CHARS = 64 << 10
JSON_OBJECT = json.dumps({"type": "object"})
_CPP_PREFIX = re.compile(r"^\[[^\]]*\] \S+?:\d+: (Check failed: \(.*?\) is false: )?")


class GrammarError(ValueError):
    """A response format that cannot be compiled into a grammar (the request's fault)."""


class Grammars:
    """The compiler for one tokenizer and vocabulary (built at the first constrained request:
    reading the vocabulary takes about half a second) and the matchers made from it."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        self.tokenizer, self.vocab_size, self.stop_token_ids = tokenizer, vocab_size, sorted(stop_token_ids)
        self._compiler = None
        self._lock = threading.Lock()

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr  # only constrained requests need it

                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_token_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=CACHE_BYTES)
            return self._compiler

    def compile(self, json_schema: str):
        """The compiled grammar of a JSON schema (text); GrammarError if it cannot be compiled."""
        if len(json_schema) > MAX_SCHEMA_CHARS:
            raise GrammarError(f"the JSON schema is over {MAX_SCHEMA_CHARS} characters")
        compiler = self._get_compiler()  # outside the try: a missing xgrammar is the server's problem
        try:
            return compiler.compile_json_schema(json_schema, any_whitespace=False)
        except Exception as e:  # noqa: BLE001 - whatever the schema makes xgrammar raise, it is the request's fault
            reason = _CPP_PREFIX.sub("", str(e).strip().splitlines()[0] if str(e).strip() else "")
            raise GrammarError(f"the JSON schema cannot be used for structured output: {reason or type(e).__name__}") \
                from None

    def matcher(self, json_schema: str) -> "Matcher":
        import xgrammar as xgr

        return Matcher(xgr.GrammarMatcher(self.compile(json_schema), override_stop_tokens=self.stop_token_ids))


class Matcher:
    """One sequence's position in its grammar: which tokens may come next."""

    def __init__(self, matcher):
        self._matcher = matcher

    def accept(self, token_id: int) -> bool:
        """Advance by a sampled token; False if the grammar does not allow it (it then stays put)."""
        return self._matcher.accept_token(token_id)

    @property
    def is_terminated(self) -> bool:
        return self._matcher.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)


@torch.inference_mode()  # the logits are the model's inference tensors
def mask_logits(logits: torch.Tensor, rows: list[int], matchers: list[Matcher]) -> None:
    """Forbid, in place, every token each matcher does not allow next in its row of `logits`
    (B, vocab) fp32. The masks are filled on the host as packed bits (one int32 per 32 tokens),
    reach the device in one copy with the rows' index, and are unpacked there by plain torch ops
    (no kernel to compile on the serving machine, the same code on the CPU and the GPU)."""
    import xgrammar as xgr

    vocab = logits.shape[-1]
    bitmask = xgr.allocate_token_bitmask(len(rows), vocab)  # (n, ceil(vocab / 32)) int32 on the host
    for i, matcher in enumerate(matchers):
        matcher.fill(bitmask, i)
    index = torch.tensor(rows, dtype=torch.int64)
    if logits.is_cuda:
        bitmask = bitmask.pin_memory().to(logits.device, non_blocking=True)
        index = index.pin_memory().to(logits.device, non_blocking=True)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :vocab].bool()  # (n, vocab): bit j of word w
    rows_logits = logits.index_select(0, index).masked_fill_(~allowed, float("-inf"))
    logits.index_copy_(0, index, rows_logits)
