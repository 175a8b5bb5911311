"""The admin API: upload, compose, list, inspect and delete customers' adapters.

Every route needs `Authorization: Bearer <LORAPLEX_ADMIN_TOKEN>` (server/api/auth.py). An upload
is checked in this order, cheapest and safest first: the token, the customer id (a strict
pattern; it becomes a directory name), the declared size, the media type, then the body is
read with a hard byte limit and at most two file parts, and only then validated in full against
the served base model (server/lora/peft.py) and stored atomically as a new version
(server/lora/store.py). A failed upload leaves nothing behind; a replacement does not disturb
requests in flight (server/service.py). A composition (POST .../compose, server/lora/compose.py)
is checked the same way: the recipe, the rights on each source (LORAPLEX_SHARED_ADAPTERS), the
sources themselves, and the composed adapter is validated and stored as an upload is.
"""

from __future__ import annotations

import asyncio
import shutil
from typing import AsyncIterator, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field
from starlette.background import BackgroundTask
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from server.api.auth import get_service, require_admin
from server.api.errors import APIError, BadRequest, MethodNotAllowed, PayloadTooLarge, to_api_error
from server.api.schemas import REQUEST_BODY
from server.lora.compose import MAX_SOURCES, Recipe, Source
from server.lora.store import CUSTOMER_ID_PATTERN, AdapterRecord, check_customer_id
from server.service import Service

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])
UPLOAD_PREFIX = "/admin/adapters/"  # uploads: bounded by their own limit (Service.upload_limit), not the body limit

CONFIG_PART = "adapter_config"
WEIGHTS_PART = "adapter_model"
MAX_CONFIG_BYTES = 1 << 20  # adapter_config.json is a few hundred bytes; 1 MiB is generous
# An adapter's sub-resources and their one method. The {customer_id:path} routes (a path-like id is
# their 400) also receive these paths for the other methods, which must be a 405 as on any path.
_SUBRESOURCES = {"compose": "POST", "merged": "GET"}
_UPLOAD_RESULTS = {"invalid_customer_id": "invalid_customer_id", "invalid_adapter": "invalid_adapter",
                   "payload_too_large": "too_large", "insufficient_storage": "store_full"}


@router.put("/adapters/{customer_id:path}", status_code=201)
async def put_adapter(customer_id: str, request: Request, service: Service = Depends(get_service)) -> JSONResponse:
    """Multipart upload of `adapter_config` (adapter_config.json) and `adapter_model`
    (adapter_model.safetensors); 201 with the stored version's metadata."""
    metrics = request.app.state.metrics
    _refuse_subresource(customer_id, "PUT")
    try:
        check_customer_id(customer_id)  # before anything else touches the request
        limit = (service.upload_limit, service.upload_limit_source)
        _check_declared_size(request, limit)
        async with request.app.state.upload_slots:
            config_bytes, weights_bytes = await _read_parts(request, limit)
            record = await asyncio.to_thread(service.put_adapter, customer_id, config_bytes, weights_bytes)
    except Exception as e:
        error = to_api_error(e)
        metrics.count_upload(_UPLOAD_RESULTS.get(error.code, "bad_request" if error.status_code < 500 else "error"))
        raise error from None
    metrics.count_upload("stored")
    return JSONResponse(_describe(service, record), status_code=201,
                        headers={"Location": f"/admin/adapters/{record.customer_id}"})


class ComposeSource(BaseModel):
    model_config = REQUEST_BODY
    customer_id: str = Field(pattern=f"^{CUSTOMER_ID_PATTERN}$")
    weight: float = Field(allow_inf_nan=False)  # negative: subtract the source's delta


class ComposeRequest(BaseModel):
    model_config = REQUEST_BODY
    sources: list[ComposeSource] = Field(min_length=1, max_length=MAX_SOURCES)
    method: Literal["cat", "svd"]
    rank: int | None = Field(None, ge=1)  # svd only: the composed rank (default: the largest source rank)


@router.post("/adapters/{customer_id:path}/compose", status_code=201)
async def compose_adapter(customer_id: str, body: ComposeRequest, request: Request,
                          service: Service = Depends(get_service)) -> JSONResponse:
    """Store the weighted composition of stored adapters as the customer's new version (peft's
    `add_weighted_adapter` with the same sources, weights and combination type); 201 with its
    metadata and the recipe."""
    check_customer_id(customer_id)
    recipe = Recipe(tuple(Source(s.customer_id, s.weight) for s in body.sources), body.method, body.rank)
    async with request.app.state.upload_slots:  # composing costs what validating an upload does
        record = await asyncio.to_thread(service.compose_adapter, customer_id, recipe)
    return JSONResponse(_describe(service, record), status_code=201,
                        headers={"Location": f"/admin/adapters/{record.customer_id}"})


@router.get("/adapters/{customer_id:path}/merged", response_class=FileResponse, responses={
    200: {"description": "a tar of the merged checkpoint directory", "content": {"application/x-tar": {}}}})
async def export_merged(customer_id: str, request: Request, service: Service = Depends(get_service)) -> FileResponse:
    """The customer's current adapter merged into the base model (`loraplex merge`), as a tar of a
    checkpoint directory that `loraplex serve --model` serves. (Declared before the detail route,
    whose path parameter would take ".../merged" too.)"""
    check_customer_id(customer_id)
    async with request.app.state.upload_slots:  # a merge reads and writes the whole checkpoint
        work, tar_path, name = await asyncio.to_thread(service.export_merged, customer_id)
    return FileResponse(tar_path, media_type="application/x-tar", filename=f"{name}.tar",
                        background=BackgroundTask(shutil.rmtree, work, ignore_errors=True))


@router.get("/adapters")
def list_adapters(service: Service = Depends(get_service)) -> dict:
    return {"object": "list", "data": [_describe(service, r) for r in service.list_adapters()]}


@router.get("/adapters/{customer_id:path}")
def get_adapter(customer_id: str, service: Service = Depends(get_service)) -> dict:
    _refuse_subresource(customer_id, "GET")
    return _describe(service, service.get_adapter(check_customer_id(customer_id)))


@router.delete("/adapters/{customer_id:path}")
def delete_adapter(customer_id: str, service: Service = Depends(get_service)) -> dict:
    """New requests for the customer get 404 at once; requests already running finish."""
    _refuse_subresource(customer_id, "DELETE")
    record = service.delete_adapter(check_customer_id(customer_id))
    return {**record.to_dict(), "deleted": True}


def _refuse_subresource(customer_id: str, method: str) -> None:
    """405 for `method` on /admin/adapters/<id>/compose or .../merged (see _SUBRESOURCES)."""
    head, _, tail = customer_id.rpartition("/")
    if head and tail in _SUBRESOURCES:
        raise MethodNotAllowed(f"method {method} is not allowed on /admin/adapters/{customer_id}",
                               headers={"Allow": _SUBRESOURCES[tail]})


def _describe(service: Service, record: AdapterRecord) -> dict:
    return {**record.to_dict(), "state": service.adapter_state(record)}


def _check_declared_size(request: Request, limit: tuple[int, str]) -> None:
    """`limit`: (bytes, where the bound comes from), as for every size check of an upload."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("invalid Content-Length header")
        if int(declared) > limit[0]:
            raise PayloadTooLarge(f"upload of {declared} bytes is over the {limit[0]}-byte limit ({limit[1]})")
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "multipart/form-data":
        raise BadRequest(f"expected a multipart/form-data upload with the file parts {CONFIG_PART!r} and "
                         f"{WEIGHTS_PART!r}, got content type {media_type or 'none'!r}", code="invalid_upload")


async def _limited(stream: AsyncIterator[bytes], limit: tuple[int, str]) -> AsyncIterator[bytes]:
    """The request body, refused as soon as it passes the limit (chunked uploads declare no size)."""
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > limit[0]:
            raise PayloadTooLarge(f"upload is over the {limit[0]}-byte limit ({limit[1]})")
        yield chunk


async def _read_parts(request: Request, limit: tuple[int, str]) -> tuple[bytes, bytes]:
    parser = MultiPartParser(request.headers, _limited(request.stream(), limit),
                             max_files=2, max_fields=2, max_part_size=MAX_CONFIG_BYTES)
    try:
        form = await parser.parse()
    except APIError:
        raise
    except MultiPartException as e:
        raise BadRequest(f"malformed multipart upload: {e.message}", code="invalid_upload") from None
    except Exception as e:  # noqa: BLE001 - whatever the multipart parser trips on is the client's
        raise BadRequest(f"malformed multipart upload ({type(e).__name__})", code="invalid_upload") from None
    try:
        names = [name for name, _ in form.multi_items()]
        unexpected = sorted(set(names) - {CONFIG_PART, WEIGHTS_PART})
        if unexpected:
            raise BadRequest(f"unexpected upload part(s) {unexpected}: send exactly {CONFIG_PART!r} and "
                             f"{WEIGHTS_PART!r}", code="invalid_upload")
        for name in (CONFIG_PART, WEIGHTS_PART):
            if names.count(name) != 1:
                raise BadRequest(f"the upload needs exactly one part named {name!r} (found {names.count(name)})",
                                 code="invalid_upload", param=name)
        config, weights = form[CONFIG_PART], form[WEIGHTS_PART]
        if not isinstance(weights, UploadFile):
            raise BadRequest(f"{WEIGHTS_PART!r} must be a file part, e.g. curl -F "
                             f"{WEIGHTS_PART}=@adapter_model.safetensors", code="invalid_upload", param=WEIGHTS_PART)
        if (weights.filename or "").lower().endswith((".bin", ".pt", ".pth", ".pkl")):
            raise BadRequest(f"{weights.filename!r} is a pickled PyTorch file, which is never loaded: upload "
                             "adapter_model.safetensors (peft's save_pretrained(..., safe_serialization=True))",
                             code="invalid_adapter", param=WEIGHTS_PART)
        config_bytes = await config.read() if isinstance(config, UploadFile) else config.encode()
        return config_bytes, await weights.read()
    finally:
        await form.close()
