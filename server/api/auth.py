"""Who is calling: the tenant of an inference request, and the admin check. FastAPI dependencies,
so tests can replace them with `app.dependency_overrides`.

Tenants. Without an API-key file the `X-Customer-Id` header is trusted as it is: deploy behind
a gateway that authenticates callers and sets it. With `LORAPLEX_API_KEYS_FILE` (a JSON object
`{"<key>": "<customer id>" | null}`, null = base model only) every inference request needs
`Authorization: Bearer <key>`, the tenant comes from the key, and a header or body `model` naming
another customer is refused. Keys are kept only as sha256 digests and looked up by digest.

Admin. `Authorization: Bearer <LORAPLEX_ADMIN_TOKEN>`, compared with `hmac.compare_digest`;
with no token configured every admin call is refused, saying how to enable the admin API.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, Header, Request

from server.api.errors import BadRequest, Forbidden, ServiceUnavailable, Unauthorized
from server.lora.store import check_customer_id
from server.service import Service

CUSTOMER_HEADER = "X-Customer-Id"


@dataclass(frozen=True)
class Tenant:
    customer_id: str | None  # None: the base model
    from_api_key: bool = False  # the tenant is fixed by an API key (a different one is forbidden)


class ApiKeys:
    def __init__(self, customers_by_digest: dict[bytes, str | None]):
        self._customers = customers_by_digest

    @classmethod
    def load(cls, path: str | Path) -> "ApiKeys":
        """Read the key file; raises ValueError with a message fit for an operator."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the API key file {path}: {e}") from None
        if not isinstance(raw, dict) or not raw:
            raise ValueError(f"the API key file {path} must be a non-empty JSON object "
                             '{"<key>": "<customer id>"}')
        customers = {}
        for key, customer in raw.items():
            if len(key) < 16:
                raise ValueError(f"the API key file {path} holds a key shorter than 16 characters")
            if customer is not None:
                check_customer_id(customer)
            customers[_digest(key)] = customer
        return cls(customers)

    def customer_of(self, key: str) -> tuple[bool, str | None]:
        """(known, customer id) for a presented key."""
        digest = _digest(key)
        return digest in self._customers, self._customers.get(digest)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def get_service(request: Request) -> Service:
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise ServiceUnavailable("the model is still loading", code="not_ready")
    return service


def get_tenant(
    request: Request,
    x_customer_id: str | None = Header(None, alias=CUSTOMER_HEADER),
    authorization: str | None = Header(None),
) -> Tenant:
    header = x_customer_id.strip() if x_customer_id else None
    api_keys: ApiKeys | None = getattr(request.app.state, "api_keys", None)
    if api_keys is None:
        return Tenant(header or None)
    key = _bearer(authorization)
    if key is None:
        raise Unauthorized("missing API key: send Authorization: Bearer <key>", code="missing_api_key")
    known, customer = api_keys.customer_of(key)
    if not known:
        raise Unauthorized("invalid API key", code="invalid_api_key")
    if header and header != customer:
        raise Forbidden(f"this API key does not belong to customer {header!r}", code="customer_mismatch",
                        param=CUSTOMER_HEADER)
    return Tenant(customer, from_api_key=True)


def select_customer(tenant: Tenant, model: str | None, service: Service) -> str | None:
    """The customer whose adapter serves the request, from the tenant and the body's `model`.

    `model` may name the base model (then the tenant's adapter, if any, applies) or a customer's
    adapter (the customer id); with a tenant as well, the two must agree."""
    names_base = model is None or model.strip() == "" or service.is_base_model_name(model)
    if tenant.customer_id is not None:
        if names_base or model == tenant.customer_id:
            return tenant.customer_id
        if tenant.from_api_key:
            raise Forbidden(f"model {model!r} is not this API key's adapter", code="customer_mismatch", param="model")
        raise BadRequest(
            f"model {model!r} does not match {CUSTOMER_HEADER} {tenant.customer_id!r}: name the customer's adapter "
            f"or the base model {service.model.name!r}, or leave one of them out", code="model_mismatch", param="model")
    if names_base:
        return None
    if tenant.from_api_key:  # a base-model-only key
        raise Forbidden(f"model {model!r} is not available to this API key", code="customer_mismatch", param="model")
    return model


def require_admin(request: Request, authorization: str | None = Header(None)) -> None:
    token = request.app.state.settings.admin_token
    if not token:
        raise Forbidden("the admin API is disabled: set the environment variable LORAPLEX_ADMIN_TOKEN to a secret "
                        "and restart the server, then send Authorization: Bearer <token>", code="admin_disabled")
    presented = _bearer(authorization)
    if presented is None:
        raise Unauthorized("missing admin token: send Authorization: Bearer <LORAPLEX_ADMIN_TOKEN>",
                           code="missing_admin_token")
    if not hmac.compare_digest(presented.encode(), token.encode()):
        raise Unauthorized("invalid admin token", code="invalid_admin_token")


AdminAuth = Depends(require_admin)
