"""The FastAPI application: `create_app(settings)`.

Everything heavy is built in `lifespan` (model load, engine thread, adapter store and cache:
`Service.start`) and kept on `app.state`; shutdown stops the engine loop, which ends every open
stream (after a drain, when the server runs under server/api/drain.py's DrainingServer). One
router per area: completions (OpenAI-compatible inference), admin (adapters), ops (health,
readiness, metrics). Errors are mapped to OpenAI's envelope in server/api/errors.py.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.api.auth import ApiKeys
from server.api.drain import Drain, DrainMiddleware
from server.api.errors import install_error_handlers, send_error
from server.api.openapi import install_openapi
from server.api.routers import admin, completions, ops
from server.config import Settings
from server.metrics import Metrics
from server.service import Service

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics(settings)
    api_keys = ApiKeys.load(settings.api_keys_file) if settings.api_keys_file else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service = await asyncio.to_thread(Service.start, settings, metrics)
        limits = service.engine.limits
        metrics.set_build_info(model=service.model.name, device=service.model.device, dtype=service.model.dtype,
                               max_loras=limits.max_loras, max_num_seqs=limits.max_num_seqs)
        metrics.bind_engine(service.snapshot)
        app.state.service = service
        try:
            yield
        finally:
            app.state.service = None
            await asyncio.to_thread(service.stop)

    app = FastAPI(title="loraplex", summary="Multi-tenant LoRA inference server (OpenAI-compatible)",
                  lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.api_keys = api_keys
    app.state.service = None
    app.state.upload_slots = asyncio.Semaphore(settings.max_concurrent_uploads)
    app.state.drain = Drain(settings.drain_seconds)
    install_error_handlers(app)
    install_openapi(app)
    app.add_middleware(BodyLimit, limit=settings.max_request_body_bytes, exempt_prefix=admin.UPLOAD_PREFIX)
    app.add_middleware(DrainMiddleware, drain=app.state.drain)
    app.add_middleware(RequestCounter, metrics=metrics)
    app.include_router(completions.router)
    app.include_router(admin.router)
    app.include_router(ops.router)
    return app


class RequestCounter:
    """ASGI middleware: count every HTTP answer by route template (bounded) and status class."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_counting(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            route = scope.get("route")
            self.metrics.count_http(getattr(route, "path", "unmatched"), status)


def stop_engine_of(app: FastAPI) -> None:
    """The drain's last resort: end the app's open streams (blocking; nothing if not started)."""
    service = app.state.service
    if service is not None:
        service.stop_engine()


def uvicorn_limits(settings: Settings) -> dict:
    """uvicorn's own bounds, from the settings: open connections (503 past them)."""
    return {"limit_concurrency": settings.max_connections or None}


class BodyLimit:
    """ASGI middleware: a request body (other than adapter uploads, which have their own limit) of
    more than `limit` bytes gets 413 in OpenAI's envelope, on its declared size at once, or as soon
    as a chunked body passes it (the app then sees the client gone, and its answer is dropped);
    nothing past the limit is buffered."""

    def __init__(self, app, limit: int, exempt_prefix: str):
        self.app, self.limit, self.exempt_prefix = app, limit, exempt_prefix

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"].startswith(self.exempt_prefix):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        received, started, refused = 0, False, False

        async def limited_receive():
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit and not started:
                    refused = True
                    await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message):
            nonlocal started
            if refused:
                return  # the 413 went out already
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited_receive, tracking_send)

    async def _refuse(self, send) -> None:
        await send_error(send, 413, f"request body over the {self.limit}-byte limit (LORAPLEX_MAX_REQUEST_BODY_BYTES)",
                         "payload_too_large")
