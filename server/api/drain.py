"""Graceful shutdown: what SIGTERM (or Ctrl-C) starts, before uvicorn's own shutdown.

A pod being replaced gets SIGTERM and, a grace period later, SIGKILL. Closing the listening
socket at once (uvicorn's default) would leave the load balancer's readiness probe with a refused
connection and clients mid-stream with a cut one. Instead, on the first signal:

1. draining starts: `/ready` answers 503 {"status": "draining"} (the probe sees it on its next
   call), and every new request other than /health, /ready and /metrics gets 503 with an
   explicit "the server is shutting down" error and `Retry-After` (a client retries elsewhere);
2. requests already in flight (streams, uploads) go on until they end, for at most
   `drain_seconds` (LORAPLEX_DRAIN_SECONDS);
3. past that, the engine loop is stopped, which ends every open stream with an error event
   ("the server is shutting down") rather than a cut connection;
4. then uvicorn shuts down as usual and the process exits 0.

A second signal skips what is left (uvicorn's own handling: the listener closes, and on a second
Ctrl-C it stops at once). `Drain` is also the ASGI middleware that counts requests in flight and
turns new ones away while draining (`DrainMiddleware` over the `Drain` state the app keeps in
`app.state.drain`); `DrainingServer` is the uvicorn server that starts it.
"""

from __future__ import annotations

import asyncio
import logging
import time

import uvicorn

from server.api.errors import send_error

log = logging.getLogger(__name__)
OPS_PATHS = frozenset({"/health", "/ready", "/metrics"})  # answered while draining, never counted
POLL_S = 0.05
FLUSH_S = 5.0  # after the engine loop stops: how long the handlers get to send their error events


class Drain:
    """Whether the server is draining, and how many requests (all but the ops routes) are in
    flight; `run()` is the drain itself (see the module docstring)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.active = False
        self.in_flight = 0

    async def run(self, stop_engine) -> None:
        """Wait for the requests in flight, at most `seconds`; then `stop_engine()` (blocking: run
        in a thread) ends what is left with an error event, which their handlers get to send."""
        self.active = True
        started = time.monotonic()
        log.info("draining: %d requests in flight, up to %.0f s", self.in_flight, self.seconds)
        await self._wait_idle(started + self.seconds)
        if self.in_flight:
            log.warning("draining: %d requests still in flight after %.0f s; ending them", self.in_flight,
                        self.seconds)
            await asyncio.to_thread(stop_engine)
            await self._wait_idle(time.monotonic() + FLUSH_S)
        log.info("drained in %.1f s", time.monotonic() - started)

    async def _wait_idle(self, deadline: float) -> None:
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)


class DrainMiddleware:
    """ASGI middleware: counts the requests in flight in `drain`, and answers new ones 503 while
    it is active (the ops routes pass, uncounted)."""

    def __init__(self, app, drain: Drain):
        self.app, self.drain = app, drain

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPS_PATHS:
            return await self.app(scope, receive, send)
        if self.drain.active:
            return await send_error(send, 503, "the server is shutting down; retry on another replica",
                                    "service_unavailable", {"Retry-After": "1", "Connection": "close"})
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose first SIGTERM / SIGINT drains (`Drain.run`) before it shuts down.

    The signal is not handed back to uvicorn's bookkeeping (which re-raises it after shutdown,
    ending the process by the signal): a drained server exits 0."""

    def __init__(self, config: uvicorn.Config, drain: Drain, stop_engine):
        super().__init__(config)
        self.drain, self.stop_engine = drain, stop_engine
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        if self._drain_task is not None or self._loop is None or self.should_exit:
            return super().handle_exit(sig, frame)  # a second signal: uvicorn's own way
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.drain.run(self.stop_engine)
        finally:
            self.should_exit = True
