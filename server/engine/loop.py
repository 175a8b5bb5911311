"""The engine's own thread, and the hand-off of its results to asyncio consumers.

Handlers call `await loop.stream(...)`: the request is tokenized off the event loop, queued
to the engine thread, and every step's new text arrives through a per-request asyncio.Queue
(`call_soon_threadsafe`). Leaving the stream early (client gone) queues an abort, which the
engine thread applies before its next step, so blocks and adapter pins are back within one
step. A request with a deadline (`GenerationRequest.deadline`) is aborted by the engine thread
once it passes, queued or running, and its stream ends with finish_reason "timeout" (checked
before every step, and every IDLE_WAIT_S when idle). A step that raises fails the sequences it
ran, never the thread.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Hashable

from server.engine.engine import Engine
from server.engine.request import GenerationRequest
from server.engine.sequence import Sequence

log = logging.getLogger(__name__)
GIL_SWITCH_INTERVAL_S = 0.0005
IDLE_WAIT_S = 0.05  # how long the idle loop sleeps before re-checking (adapter loads, stop)


@dataclass
class StreamEvent:
    text: str  # new text since the previous event
    token_ids: list[int]  # new token ids since the previous event
    finish_reason: str | None = None  # set on the last event: "stop" | "length" | "abort" | "error"
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list | None = None  # TokenLogprob of each of token_ids, when the request asks for them
    prompt_logprobs: list | None = None  # on the first event of a request asking for them: the prompt's


class EngineLoop:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)
        self._consumers: dict[int, _Consumer] = {}
        self._deadlines: list[tuple[float, int]] = []  # heap of (deadline, seq_id)
        self.last_step_at = 0.0  # monotonic time of the last completed loop iteration
        self.num_steps = 0

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        # On a GPU the engine thread gives up the GIL while a step runs and wants it back as soon
        # as the step's tokens arrive; by default a thread busy writing streams keeps it for up
        # to 5 ms, longer than a whole decode step. (On the CPU the engine thread computes between
        # its ops with the GIL held; shorter turns there only add switches.)
        if self.engine.device.type == "cuda":
            sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    @property
    def thread_ended(self) -> bool:
        """The engine thread runs no step now or later (stopped, or never started)."""
        return not self._thread.is_alive()

    # -- asyncio side -------------------------------------------------------------------------

    async def stream(self, request: GenerationRequest, adapter_key: Hashable | None = None) -> AsyncIterator[StreamEvent]:
        """Events for one request until its final event (the one with finish_reason)."""
        seq = await asyncio.to_thread(self.engine.make_sequence, request, adapter_key)
        consumer = _Consumer(asyncio.get_running_loop(), asyncio.Queue(), seq)
        self._send(("add", seq, consumer))
        finished = False
        try:
            while True:
                event = _coalesce(await consumer.queue.get(), consumer.queue)
                yield event
                if event.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:
                self._send(("abort", seq, None))

    def _send(self, command) -> None:
        self._commands.put(command)
        self._wake.set()

    # -- engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._apply_commands()
            self._expire_deadlines()
            if not self.engine.has_work():
                self.last_step_at = time.monotonic()
                self._wake.wait(IDLE_WAIT_S)
                self._wake.clear()
                continue
            try:
                updated = self.engine.step()
            except Exception as exc:  # a broken step fails its batch, not the server
                log.exception("engine step failed")
                updated = self.engine.fail_running(f"internal error in the engine step: {type(exc).__name__}")
            self.num_steps += 1
            self.last_step_at = time.monotonic()
            self._publish(updated)
            if self.engine.last_step_idle:
                self._wake.wait(0.002)  # waiting on adapter loads: do not spin
                self._wake.clear()
        for seq_id, consumer in list(self._consumers.items()):  # shutting down: end every stream
            self.engine.abort(consumer.seq)
            consumer.send(StreamEvent("", [], finish_reason="abort", error="the server is shutting down"))
        self._consumers.clear()

    def _apply_commands(self) -> None:
        while True:
            try:
                kind, seq, consumer = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._consumers[seq.seq_id] = consumer
                if seq.request.deadline is not None:
                    heapq.heappush(self._deadlines, (seq.request.deadline, seq.seq_id))
                self.engine.submit(seq)
            elif kind == "abort" and seq.seq_id in self._consumers:
                del self._consumers[seq.seq_id]
                self.engine.abort(seq)

    def _expire_deadlines(self) -> None:
        """Abort the sequences whose deadline passed; their streams end with finish_reason "timeout"."""
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, seq_id = heapq.heappop(self._deadlines)
            consumer = self._consumers.pop(seq_id, None)
            if consumer is None:  # ended already
                continue
            seq = consumer.seq
            self.engine.abort(seq)
            text, ids = consumer.take_new(seq)
            consumer.send(consumer.with_logprobs(seq, StreamEvent(
                text, ids, "timeout", "the request ran past its deadline", len(seq.prompt_ids), len(seq.output_ids))))
        if len(self._deadlines) > 4 * len(self._consumers) + 64:  # mostly ended requests: drop them
            self._deadlines = [(d, i) for d, i in self._deadlines if i in self._consumers]
            heapq.heapify(self._deadlines)

    def _publish(self, updated: list[Sequence]) -> None:
        """Hand the step's new text to the consumers: one wake-up per event loop per step,
        not one per sequence (the loop is busy writing 64-256 streams)."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[_Consumer, StreamEvent]]] = {}
        for seq in updated:
            consumer = self._consumers.get(seq.seq_id)
            if consumer is None:
                continue
            sent_tokens = consumer.sent_tokens
            text, ids = consumer.take_new(seq)
            if seq.is_finished:
                del self._consumers[seq.seq_id]
                event = StreamEvent(text, ids, seq.finish_reason, seq.error, len(seq.prompt_ids), len(seq.output_ids))
            elif text or ids:
                event = StreamEvent(text, ids, prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.output_ids))
            else:
                continue
            if seq.output_logprobs is not None or seq.prompt_logprobs is not None:
                consumer.with_logprobs(seq, event, sent_tokens)
            batches.setdefault(consumer.loop, []).append((consumer, event))
        for loop, batch in batches.items():
            _deliver(loop, batch)


def _deliver(loop: asyncio.AbstractEventLoop, batch: list[tuple["_Consumer", StreamEvent]]) -> None:
    try:
        loop.call_soon_threadsafe(_put_all, batch)
    except RuntimeError:  # the consumers' event loop is closed: nobody is listening
        pass


def _put_all(batch: list[tuple["_Consumer", StreamEvent]]) -> None:
    for consumer, event in batch:
        consumer.queue.put_nowait(event)


def _coalesce(event: StreamEvent, pending: asyncio.Queue) -> StreamEvent:
    """Merge the events already waiting into one: a consumer that fell behind (a slow client,
    a busy event loop) catches up in one write instead of one per token."""
    while event.finish_reason is None and not pending.empty():
        later = pending.get_nowait()
        event = StreamEvent(event.text + later.text, event.token_ids + later.token_ids, later.finish_reason,
                            later.error, later.prompt_tokens, later.completion_tokens,
                            _join(event.logprobs, later.logprobs), _join(event.prompt_logprobs, later.prompt_logprobs))
    return event


def _join(a: list | None, b: list | None) -> list | None:
    return b if a is None else a if b is None else a + b


class _Consumer:
    """One stream's queue, and how much of its sequence's output it has already been sent."""

    def __init__(self, loop: asyncio.AbstractEventLoop, q: asyncio.Queue, seq: Sequence):
        self.loop, self.queue, self.seq = loop, q, seq
        self.sent_chars = 0
        self.sent_tokens = 0
        self.sent_prompt_logprobs = False

    def take_new(self, seq: Sequence) -> tuple[str, list[int]]:
        stable = seq.text if seq.is_finished else _stable_prefix(seq.text, seq.sampling.stop)
        text = stable[self.sent_chars :] if len(stable) > self.sent_chars else ""
        self.sent_chars = max(self.sent_chars, len(stable))
        ids = seq.output_ids[self.sent_tokens :]
        self.sent_tokens = len(seq.output_ids)
        return text, ids

    def with_logprobs(self, seq: Sequence, event: StreamEvent, sent_tokens: int | None = None) -> StreamEvent:
        """Add the log-probabilities of the event's tokens (those after `sent_tokens`), and the
        prompt's on the first event that can carry them."""
        first = self.sent_tokens - len(event.token_ids) if sent_tokens is None else sent_tokens
        if seq.output_logprobs is not None:
            event.logprobs = seq.output_logprobs[first : first + len(event.token_ids)]
        if seq.prompt_logprobs is not None and not self.sent_prompt_logprobs:
            self.sent_prompt_logprobs = True
            event.prompt_logprobs = seq.prompt_logprobs
        return event

    def send(self, event: StreamEvent) -> None:
        _deliver(self.loop, [(self, event)])


def _stable_prefix(text: str, stops: tuple[str, ...]) -> str:
    """Text that can no longer change: without a trailing partial UTF-8 character, and
    without a tail that might still grow into a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[end - k : end] == stop[:k]:
                end -= k
                break
    return text[:end]
