"""Attention kernels over the paged KV cache, and the choice of backend.

The backend is chosen once per worker: Triton when the cache lives on CUDA, the
pure-torch reference otherwise; `QUIRE_ATTENTION_BACKEND=torch|triton` overrides.
"""
from __future__ import annotations

import os

BACKENDS = ("torch", "triton")


def select_attention_backend(device_type: str) -> str:
    """Return the backend name for a KV cache on `device_type` ("cuda", "cpu", ...)."""
    chosen = os.environ.get("QUIRE_ATTENTION_BACKEND", "").strip().lower()
    if chosen and chosen not in BACKENDS:
        raise ValueError(f"QUIRE_ATTENTION_BACKEND must be one of {BACKENDS}, got {chosen!r}")
    if not chosen:
        chosen = "triton" if device_type == "cuda" and _triton_kernels_available() else "torch"
    if chosen == "triton" and not _triton_kernels_available():
        raise RuntimeError(
            "QUIRE_ATTENTION_BACKEND=triton, but quire's Triton paged-attention kernels are not "
            "built into this version; use the torch backend"
        )
    return chosen


def _triton_kernels_available() -> bool:
    try:
        from quire.kernels import triton_attention  # noqa: F401
    except ImportError:
        return False
    return True
