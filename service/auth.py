"""Optional API-key authentication, shared by the REST middleware and the gRPC interceptor.

Off unless ``CELLEXPLAIN_API_KEYS`` is set. A request carries ``Authorization: Bearer KEY`` or
``X-API-Key: KEY`` (gRPC: the same names as metadata). Health probes and ``/metrics`` stay open.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from cellexplain.api.errors import InvalidInputError, UnauthenticatedError

__all__ = ["OPEN_GRPC_PREFIXES", "OPEN_PATHS", "check", "check_metadata", "presented_key"]

#: paths and gRPC methods that never need a key (probes, metrics, OIP health)
OPEN_PATHS = ("/livez", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready")
OPEN_GRPC_PREFIXES = ("/grpc.health.v1.Health/",)


def presented_key(authorization: str | None, api_key: str | None) -> str | None:
    """The key a caller presented, from ``Authorization: Bearer ...`` or ``X-API-Key``."""
    if api_key:
        return api_key.strip()
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None


def check(keys: Sequence[str], authorization: str | None, api_key: str | None) -> None:
    """Raise :class:`UnauthenticatedError` unless the presented key is one of ``keys``."""
    if not keys:
        return
    key = presented_key(authorization, api_key)
    if key is None:
        raise UnauthenticatedError(
            "missing API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'", "headers"
        )
    # compare against every key in constant time, so timing does not reveal which matched
    matched = False
    for k in keys:
        matched |= hmac.compare_digest(key.encode(), k.encode())
    if not matched:
        raise UnauthenticatedError("invalid API key", "headers")


def check_metadata(keys: Sequence[str], metadata: Sequence[tuple[str, object]]) -> None:
    """:func:`check` on gRPC metadata (key, value) pairs; ``authorization`` or ``x-api-key``
    given twice is refused (:class:`InvalidInputError`), as REST refuses the headers twice:
    one would be read silently, and a proxy might read the other."""
    found: dict[str, str] = {}
    for k, v in metadata:
        name = str(k).lower()
        if name in ("authorization", "x-api-key"):
            if name in found:
                raise InvalidInputError(f"metadata {name} is given more than once", "metadata")
            found[name] = v if isinstance(v, str) else ""
    check(keys, found.get("authorization"), found.get("x-api-key"))
