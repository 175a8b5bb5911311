"""Operations: liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import generate_latest

router = APIRouter(tags=["ops"])
# The classic text format: every Prometheus and the Inference Extension's endpoint picker parse it.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@router.get("/health")
def health() -> dict:
    """The process is alive and answering HTTP."""
    return {"status": "ok"}


@router.get("/ready")
def ready(request: Request) -> JSONResponse:
    """The model is loaded and the engine loop is running and making progress (503 while
    loading, stalled, or draining before shutdown)."""
    drain = getattr(request.app.state, "drain", None)
    if drain is not None and drain.active:
        return JSONResponse({"status": "draining"}, status_code=503)
    service = getattr(request.app.state, "service", None)
    if service is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    if not service.is_ready():
        return JSONResponse({"status": "engine loop stopped or stalled"}, status_code=503)
    return JSONResponse({"status": "ready", "model": service.model.name})


@router.get("/metrics")
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=METRICS_CONTENT_TYPE)
