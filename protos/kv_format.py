"""The KV cache formats `--kv-cache-dtype` names, as controller, planner and workers agree
on them (`LoadModelRequest.kv_cache_dtype` carries the name), and the bytes each takes.

Torch-free, so the controller and `quire plan` compute capacity with the workers' own
arithmetic; `quire.kernels.kv_quant` maps the names to tensor dtypes and does the quantizing.
"""
from __future__ import annotations

KV_CACHE_DTYPES = ("auto", "int8", "fp8_e4m3")  # auto: the model's dtype
QUANTIZED_KV_CACHE_DTYPES = ("int8", "fp8_e4m3")  # one-byte codes plus a scale per token and KV head
SCALE_BYTES = 2  # a float16 scale


def bytes_per_token_head(head_size: int, value_bytes: int, kv_cache_dtype: str) -> int:
    """Bytes one token's K (or V) of one KV head takes in a cache of `kv_cache_dtype` whose
    unquantized values take `value_bytes` each: `head_size` values, or, quantized, as many
    one-byte codes plus the scale. ValueError naming the field for an unknown name."""
    if kv_cache_dtype == "auto":
        return head_size * value_bytes
    if kv_cache_dtype not in QUANTIZED_KV_CACHE_DTYPES:
        raise ValueError(f"`kv_cache_dtype` must be one of {', '.join(KV_CACHE_DTYPES)} (got {kv_cache_dtype!r})")
    return head_size + SCALE_BYTES
