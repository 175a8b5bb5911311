"""Typed errors turned into HTTP answers, in one place.

Every error leaves as OpenAI's envelope, which the `openai` client parses:

    {"error": {"message": "...", "type": "invalid_request_error", "code": "...", "param": null}}

Errors raised where they arise (the store's `AdapterNotFound`, the PEFT parser's
`AdapterValidationError`, FastAPI's request validation, unknown routes) are mapped here; the
routers raise the `APIError` subclasses below for everything else.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.lora.compose import RecipeError, SourceForbidden
from server.lora.peft import AdapterValidationError
from server.lora.store import AdapterNotFound, AdapterStoreCorrupt, AdapterStoreFull, InvalidCustomerId

log = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
    415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
    503: "service_unavailable_error", 504: "timeout_error", 507: "insufficient_storage_error",
}


class APIError(Exception):
    status_code = 500
    default_code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.param = param
        self.headers = headers

    @property
    def error_type(self) -> str:
        return _TYPE_BY_STATUS.get(self.status_code, "internal_error")


class BadRequest(APIError):
    status_code, default_code = 400, "invalid_request"


class Unauthorized(APIError):
    status_code, default_code = 401, "invalid_authentication"

    def __init__(self, message: str, **kwargs):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"}, **kwargs)


class Forbidden(APIError):
    status_code, default_code = 403, "forbidden"


class NotFound(APIError):
    status_code, default_code = 404, "not_found"


class MethodNotAllowed(APIError):
    status_code, default_code = 405, "method_not_allowed"


class PayloadTooLarge(APIError):
    status_code, default_code = 413, "payload_too_large"


class TooManyRequests(APIError):
    status_code, default_code = 429, "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: int, **kwargs):
        super().__init__(message, headers={"Retry-After": str(retry_after_s)}, **kwargs)


class ServiceUnavailable(APIError):
    status_code, default_code = 503, "service_unavailable"


class DeadlineExceeded(APIError):
    status_code, default_code = 504, "deadline_exceeded"


class InsufficientStorage(APIError):
    status_code, default_code = 507, "insufficient_storage"


class InternalError(APIError):
    status_code, default_code = 500, "internal_error"


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPE_BY_STATUS.get(status, "internal_error"),
                      "code": code, "param": param}}


async def send_error(send, status: int, message: str, code: str, headers: dict[str, str] | None = None) -> None:
    """The envelope as a whole raw ASGI response (for middleware, below FastAPI's handlers)."""
    body = json.dumps(error_body(status, message, code)).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]})
    await send({"type": "http.response.body", "body": body})


def error_response(status: int, message: str, code: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


def to_api_error(exc: Exception) -> APIError:
    """The APIError an exception from below the API layer stands for."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidCustomerId):
        return BadRequest(str(exc), code="invalid_customer_id", param="customer_id")
    if isinstance(exc, AdapterNotFound):
        return NotFound(str(exc), code="adapter_not_found")
    if isinstance(exc, AdapterValidationError):
        return BadRequest(f"invalid adapter: {exc}", code="invalid_adapter", param=exc.field)
    if isinstance(exc, RecipeError):
        return BadRequest(f"invalid recipe: {exc}", code="invalid_recipe", param=exc.field)
    if isinstance(exc, SourceForbidden):
        return Forbidden(str(exc), code="source_forbidden", param=exc.field)
    if isinstance(exc, AdapterStoreFull):
        return InsufficientStorage(str(exc))
    if isinstance(exc, AdapterStoreCorrupt):
        return InternalError(str(exc), code="adapter_store_corrupt")
    log.error("unexpected error", exc_info=exc)
    return InternalError(f"internal server error ({type(exc).__name__})")


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        err = to_api_error(exc)
        return error_response(err.status_code, err.message, err.code, err.param, err.headers)

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_error(exc.errors())
        return error_response(400, message, "invalid_request", param)

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
            headers = {"Allow": ", ".join(_allowed_methods(request))}
            return error_response(405, message, "method_not_allowed", headers=headers)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, message, code, headers=getattr(exc, "headers", None))

    for exc_class in (APIError, InvalidCustomerId, AdapterNotFound, AdapterValidationError, AdapterStoreCorrupt,
                      RecipeError, SourceForbidden):
        app.add_exception_handler(exc_class, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, api_error)  # last resort: still the envelope, never a traceback


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route takes on this path (one path may have a route per method)."""
    from starlette.routing import Match

    methods: set[str] = set()
    for route in request.app.routes:
        match, _ = route.matches({**request.scope, "method": "__none__"})
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def describe_validation_error(errors: list[dict]) -> tuple[str, str | None]:
    """A readable one-line message for pydantic's errors, and the first offending parameter."""
    parts, param = [], None
    for error in errors[:3]:
        loc = [str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path", "header")]
        if error.get("type") == "json_invalid":
            parts.append(f"the request body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}")
            continue
        where = ".".join(loc)
        param = param or where or None
        parts.append(f"{where}: {error['msg']}" if where else error["msg"])
    if len(errors) > 3:
        parts.append(f"and {len(errors) - 3} more")
    return "; ".join(parts) or "invalid request", param
