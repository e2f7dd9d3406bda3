"""Attention kernels over the paged KV cache, and the choice of backend.

`AttentionBackend` (kernels/backend.py) is the contract a worker drives; the pure-torch
reference, the C++ CPU kernel (`cpu_attention`, built on first use) and the Triton kernels
implement it. The backend is chosen once per worker by `select_backend`: Triton when the
cache lives on CUDA, the C++ kernel on the CPU (the torch reference where it cannot be
built); `QUIRE_ATTENTION_BACKEND=torch|triton|cpu` overrides. This package imports neither the
controller (quire.cluster) nor the worker (quire.worker).
"""
from __future__ import annotations

from quire.kernels.backend import BACKENDS, AttentionBackend, AttentionPlan, WarmUpResult, select_backend

__all__ = ["BACKENDS", "AttentionBackend", "AttentionPlan", "WarmUpResult", "select_backend"]
