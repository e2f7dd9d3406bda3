"""The attention backend contract a worker drives each step, and the choice of backend.

A worker chooses one `AttentionBackend` when it sets up (`select_backend`) and hands it
to its layers through the step's metadata; nothing here is global or mutable (beyond a
once-only warning). Per step the worker asks the backend for a plan once (`plan`), then
every layer writes its K/V (`write_kv`) and attends (`attend`) with that plan. Three
implementations: the pure-torch reference (`attention_ref.TorchAttentionBackend`), the C++
CPU kernel that reads K/V in place (`cpu_attention.CpuPagedAttentionBackend`, the CPU
default) and the Triton kernels (`triton_attention.TritonAttentionBackend`).

Layouts (one layer, one rank), shared by both: caches `[num_blocks, block_size,
num_kv_heads, head_dim]`; queries and outputs `[num_tokens, num_heads, head_dim]`; K/V to
write `[num_tokens, num_kv_heads, head_dim]`. `num_heads` is a multiple of `num_kv_heads`.

Quantized caches (`kv_quant`): caches of int8 or float8_e4m3fn hold one-byte codes, and
each layer has a float16 scale per (token, KV head) for K and for V, `[num_blocks,
block_size, num_kv_heads]` (contiguous), indexed like the cache. `write_kv` computes
codes and scales (kv_quant's rule, bit for bit the same in every backend) and `attend`
dequantizes inside; for a cache of values the scales are None and never read.
"""
from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

BACKENDS = ("torch", "triton", "cpu")
OVERRIDE_ENV = "QUIRE_ATTENTION_BACKEND"

logger = logging.getLogger(__name__)
_cpu_warned = False  # the fallback from the CPU kernel to torch is logged once per process


@dataclass(frozen=True)
class AttentionPlan:
    """The layer-independent part of one step's attention, built once by `AttentionBackend.plan`
    and shared by every layer; valid while the step's block tables and lengths are unchanged.

    block_tables: `[num_reqs, max_blocks]` physical block ids on the cache's device (padding
    entries are never read past `seq_lens`); seq_lens[i]: context tokens of request i once
    this step's K/V are written; query_start_loc: prefix sums of the query lengths
    (`num_reqs + 1` entries, host lists). `kernel_plan` is the backend's own precomputation
    (a RefAttentionPlan, a TritonAttentionPlan); only the backend that built it reads it.
    A static plan (`AttentionBackend.static_decode_plan`) has empty host lists: its lengths
    live on the device and change between replays.
    """

    block_tables: torch.Tensor
    seq_lens: list[int]
    query_start_loc: list[int]
    kernel_plan: object


@dataclass(frozen=True)
class WarmUpResult:
    """What `AttentionBackend.warm_up` did: how many kernel variants it compiled (or at least
    launched, when some were already cached) and the wall-clock seconds it took."""

    variants: int
    seconds: float


class AttentionBackend(ABC):
    """Paged attention over a ragged batch. Implementations keep no per-step state, so one
    instance serves every step and layer of a worker."""

    name: ClassVar[str]  # as `QUIRE_ATTENTION_BACKEND` names it

    @abstractmethod
    def plan(self, block_tables: torch.Tensor, seq_lens: list[int], query_start_loc: list[int], *,
             block_size: int, num_heads: int, num_kv_heads: int) -> AttentionPlan:
        """The step's plan for this rank's `num_heads` query heads over `num_kv_heads` KV heads
        in blocks of `block_size` tokens (arguments as `AttentionPlan` describes them)."""

    @abstractmethod
    def write_kv(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None) -> None:
        """Write token t's `key[t]`/`value[t]` into flat slot `slot_mapping[t]`
        (`block * block_size + offset`), in place, cast to the cache dtype; slots are distinct.
        A quantized cache (`kv_quant.is_quantized(k_cache.dtype)`) gets `kv_quant.quantize`'s codes,
        and its scales go to the same slots of `k_scale`/`v_scale`, which it requires (ValueError)."""

    @abstractmethod
    def attend(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan,
               scale: float, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Each query row's attention over its request's paged context, causally: request i's
        queries sit at positions `seq_lens[i] - query_len_i ... seq_lens[i] - 1`. Query head h
        uses KV head `h // (num_heads // num_kv_heads)`. Returns a new tensor in the query's
        dtype and shape. `plan` must come from this backend's `plan`. A quantized cache is read
        as `kv_quant.dequantize(codes, scale)` with its required `k_scale`/`v_scale` (ValueError)."""

    def static_decode_plan(self, block_tables: torch.Tensor, seq_lens: torch.Tensor, *, max_seq_len: int,
                           block_size: int, num_heads: int, num_kv_heads: int) -> AttentionPlan | None:
        """A plan that stays valid while the *contents* of its tensors change, for a CUDA graph of
        a decode-only batch: `block_tables` `[num_reqs, width]` and `seq_lens` `[num_reqs]` (int32,
        each in `1..max_seq_len`) are static device buffers the caller rewrites before each run;
        every request has exactly one query row (query_start_loc is `0..num_reqs`). Launches made
        with it take no decision from host values (grid, split count, chunk length are fixed here),
        so they can be captured once and replayed. None (the default) when this backend's plans
        depend on host values: its decode steps cannot be captured."""
        return None

    def warm_up(self, *, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                device: torch.device | str, kv_cache_dtype: torch.dtype | None = None) -> WarmUpResult:
        """Prepare, before serving, everything later steps would otherwise build on first use
        (compiled kernels) for this rank's `num_heads` query heads over `num_kv_heads` KV heads of
        `head_dim`, blocks of `block_size` tokens, activations (queries, K/V to write) in `dtype`
        and caches in `kv_cache_dtype` (None: `dtype`; int8 / float8_e4m3fn: quantized) on `device`.
        Touches no caller state (it may allocate and free small buffers). The default does nothing."""
        return WarmUpResult(variants=0, seconds=0.0)


def select_backend(device: torch.device | str, override: str | None = None) -> AttentionBackend:
    """The backend for a KV cache on `device`: Triton when it is on CUDA (and the Triton kernels
    import); on the CPU the C++ in-place kernel (`cpu_attention`), built or loaded from the
    extension cache here, or the torch reference when it cannot be built (one warning per
    process); torch for any other device. `override` ("torch", "triton" or "cpu") forces one;
    None reads `QUIRE_ATTENTION_BACKEND` from the environment (empty: no override). ValueError
    for an unknown name, RuntimeError when Triton or the CPU kernel is forced but unavailable."""
    global _cpu_warned
    device_type = torch.device(device).type
    chosen = (os.environ.get(OVERRIDE_ENV, "") if override is None else override).strip().lower()
    if chosen and chosen not in BACKENDS:
        raise ValueError(f"{OVERRIDE_ENV} must be one of {BACKENDS}, got {chosen!r}")
    if not chosen:
        # Only a CUDA cache tries Triton: on the CPU its import (and the interpreter) is never paid for.
        chosen = "triton" if device_type == "cuda" and _triton_backend() is not None else \
            "cpu" if device_type == "cpu" else "torch"
        if chosen == "cpu":
            backend, error = _cpu_backend()
            if backend is not None:
                return backend
            if not _cpu_warned:
                _cpu_warned = True
                logger.warning("%s; falling back to the torch reference attention (slower)", error)
            chosen = "torch"
    if chosen == "triton":
        backend = _triton_backend()
        if backend is None:
            raise RuntimeError(
                f"{OVERRIDE_ENV}=triton, but quire's Triton paged-attention kernels are not "
                "built into this version; use the torch backend"
            )
        return backend
    if chosen == "cpu":
        if device_type != "cpu":
            raise RuntimeError(f"{OVERRIDE_ENV}=cpu needs a KV cache on the CPU, not on {device_type}")
        backend, error = _cpu_backend()
        if backend is None:
            raise RuntimeError(f"{OVERRIDE_ENV}=cpu, but {error}; use the torch backend")
        return backend
    from quire.kernels.attention_ref import TorchAttentionBackend

    return TorchAttentionBackend()


def _cpu_backend() -> tuple[AttentionBackend | None, str]:
    """The CPU kernel's backend with its extension loaded (built first if no cached build
    exists), or None and why not."""
    from quire.kernels import cpu_attention

    try:
        cpu_attention.load_extension()
    except cpu_attention.ExtensionUnavailable as exc:
        return None, str(exc)
    return cpu_attention.CpuPagedAttentionBackend(), ""


def _triton_backend() -> AttentionBackend | None:
    """A Triton backend, or None when Triton (or its kernels module) cannot be imported."""
    try:
        from quire.kernels.triton_attention import TritonAttentionBackend
    except ImportError:
        return None
    return TritonAttentionBackend()
