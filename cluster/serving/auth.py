"""API keys, shared by both frontends: HTTP `Authorization: Bearer KEY`, gRPC `authorization` metadata."""
from __future__ import annotations

import hmac


def key_matches(given: str | None, api_key: str) -> bool:
    """Whether an `Authorization` value is `Bearer <api_key>` (compared in constant time)."""
    return given is not None and hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())
