"""Admission control: bounds on the generations waiting for the engine, server-wide and per tenant.

A generation (one choice of a request) is *queued* from its admission until its request's first
event (its prompt went through the engine) and *in flight* until its stream ends. Past a bound a
request is refused at once, so that the API answers 429 with a Retry-After in milliseconds instead
of leaving the client behind a queue it cannot get through in time:

- `max_queued`: queued generations server-wide (the contract's `--max-queued-requests`);
- `max_queued_per_tenant`: queued generations of one tenant, so that a tenant flooding the
  server fills its own share of the queue and not everyone's (the scheduler then serves the
  admitted tenants round-robin);
- `max_in_flight_per_tenant`: queued or running generations of one tenant;
- `max_queued_tokens`, `max_queued_tokens_per_tenant`: the prompt tokens of the queued
  generations (what the engine must prefill before they start), server-wide and per tenant.

0 turns a bound off. Tenants are the API's callers: a customer id, or "" for the base model's
callers without one. Plain Python with a lock (handlers run on the event loop, but a dropped
stream may be finalised elsewhere); no engine state is read, so admission never waits.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

RETRY_AFTER_S = 1  # what a refused client is told: the queue moves by many requests a second


@dataclass(frozen=True)
class AdmissionLimits:
    max_queued: int = 0
    max_queued_per_tenant: int = 0
    max_in_flight_per_tenant: int = 0
    max_queued_tokens: int = 0
    max_queued_tokens_per_tenant: int = 0


class Overloaded(Exception):
    """A bound is reached; `reason` names which (a metric label), `retry_after_s` what to tell the client."""

    def __init__(self, message: str, reason: str, retry_after_s: int = RETRY_AFTER_S):
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


class Admission:
    def __init__(self, limits: AdmissionLimits):
        self.limits = limits
        self._lock = threading.Lock()
        self._queued = self._queued_tokens = 0
        self._queued_by_tenant: Counter[str] = Counter()
        self._queued_tokens_by_tenant: Counter[str] = Counter()
        self._in_flight_by_tenant: Counter[str] = Counter()

    @property
    def num_queued(self) -> int:
        return self._queued

    def admit(self, tenant: str, generations: int, prompt_tokens: int = 0) -> "Ticket":
        """Count a request of `generations` choices and `prompt_tokens` (all choices together)
        in, or raise Overloaded (nothing counted)."""
        limits = self.limits
        with self._lock:
            # (count now, what this request adds, bound, what is counted, whose, reason), the first reached refuses
            checks = (
                (self._queued_tokens, prompt_tokens, limits.max_queued_tokens, "prompt tokens queued",
                 "the server", "queued_tokens"),
                (self._queued_tokens_by_tenant[tenant], prompt_tokens, limits.max_queued_tokens_per_tenant,
                 "prompt tokens queued", "this tenant", "tenant_queued_tokens"),
                (self._queued, generations, limits.max_queued, "generations queued", "the server", "queue_full"),
                (self._queued_by_tenant[tenant], generations, limits.max_queued_per_tenant, "generations queued",
                 "this tenant", "tenant_queue_full"),
                (self._in_flight_by_tenant[tenant], generations, limits.max_in_flight_per_tenant,
                 "generations in flight", "this tenant", "tenant_concurrency"),
            )
            for count, adding, bound, what, whose, reason in checks:
                if bound and count + adding > bound:
                    raise Overloaded(f"{whose} has {count} {what} (at most {bound}); retry later", reason)
            self._queued += generations
            self._queued_tokens += prompt_tokens
            self._queued_by_tenant[tenant] += generations
            self._queued_tokens_by_tenant[tenant] += prompt_tokens
            self._in_flight_by_tenant[tenant] += generations
        return Ticket(self, tenant, generations, prompt_tokens)

    def _release(self, ticket: "Ticket", queued: bool, in_flight: bool) -> None:
        tenant, generations = ticket.tenant, ticket.generations
        with self._lock:
            if queued:
                self._queued -= generations
                self._queued_tokens -= ticket.prompt_tokens
                _decrement(self._queued_by_tenant, tenant, generations)
                _decrement(self._queued_tokens_by_tenant, tenant, ticket.prompt_tokens)
            if in_flight:
                _decrement(self._in_flight_by_tenant, tenant, generations)


class Ticket:
    """One admitted request: `started()` at its first event, `close()` when it ends (both idempotent)."""

    def __init__(self, admission: Admission, tenant: str, generations: int, prompt_tokens: int):
        self._admission, self.tenant, self.generations, self.prompt_tokens = admission, tenant, generations, prompt_tokens
        self._queued = self._open = True

    def started(self) -> None:
        if self._queued:
            self._queued = False
            self._admission._release(self, queued=True, in_flight=False)

    def close(self) -> None:
        if self._open:
            self._open = False
            self._admission._release(self, queued=self._queued, in_flight=True)
            self._queued = False


def _decrement(counter: Counter, key: str, n: int) -> None:
    counter[key] -= n
    if counter[key] <= 0:
        del counter[key]  # idle tenants leave no entries behind
