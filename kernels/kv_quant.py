"""Quantized paged KV: the formats, and the one quantization rule every backend follows.

A quantized cache stores each written token's K (and V) for each KV head as `head_dim`
one-byte codes plus one scale: `value ≈ code * scale`. The scale is computed when the token
is written, from that token's values for that head (`scale = amax / QMAX`, rounded to
`SCALE_DTYPE`), and lives beside its page in a tensor `[num_blocks, block_size,
num_kv_heads]` indexed like the cache, so every move of a block (swap, copy-on-write)
moves its scales too.

- `int8`: codes in -127..127, rounded to nearest (ties away from zero).
- `fp8_e4m3`: codes in float8 e4m3 (`torch.float8_e4m3fn`, max 448), rounded to the
  nearest representable value (ties away from zero). The scale is per KV head like int8's,
  and, like int8's, computed per token when it is written, so no calibration data is needed
  and an outlier token costs precision only to itself. e4m3 keeps 3 mantissa bits (a
  relative error up to 1/16 per value) against int8's uniform grid (up to amax/254): int8
  is the more accurate of the two for typical K/V rows; fp8 is there for hardware and
  checkpoints that expect it. Measured costs: `benchmarks/kv_accuracy.py`.

Scales are float16: 2 bytes per token and head beside `head_dim` code bytes, so at head
dim 128 a quantized token takes 130/256 of bf16's bytes (1.97x the tokens) and 130/512 of
fp32's (3.94x). A scale never falls below float16's smallest normal (`MIN_SCALE`), so it
is never 0 and codes of an all-zero row stay 0.

Both backends (`attention_ref` in torch, `triton_attention` in Triton) implement the rule
bit for bit the same way: the rounding is done in fp32 arithmetic onto the format's grid
before the final cast, which is then exact (Triton's interpreter mis-rounds some direct
fp32 → fp8 casts).
"""
from __future__ import annotations

import torch

from quire.protos import kv_format
from quire.protos.kv_format import KV_CACHE_DTYPES

SCALE_DTYPE = torch.float16  # kv_format.SCALE_BYTES each
MIN_SCALE = 2.0 ** -14   # float16's smallest normal
MAX_SCALE = 65504.0      # float16's largest
INT8_MAX = 127.0
FP8_MAX = 448.0
FP8_MANTISSA_BITS = 3
FP8_MIN_EXPONENT = -6    # e4m3's smallest normal exponent; below it the grid is uniform (subnormals)

_QUANTIZED = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}


def cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the cache tensors for a `--kv-cache-dtype` name: the model's for "auto"."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype not in _QUANTIZED:
        raise ValueError(f"`kv_cache_dtype` must be one of {', '.join(KV_CACHE_DTYPES)} (got {kv_cache_dtype!r})")
    return _QUANTIZED[kv_cache_dtype]


def is_quantized(dtype: torch.dtype) -> bool:
    """Whether a cache of `dtype` holds codes with scales (int8, fp8 e4m3) rather than values."""
    return dtype in (torch.int8, torch.float8_e4m3fn)


def code_max(dtype: torch.dtype) -> float:
    """The largest code magnitude of a quantized cache dtype."""
    return INT8_MAX if dtype == torch.int8 else FP8_MAX


def bytes_per_token_head(head_size: int, dtype: torch.dtype) -> int:
    """Bytes one token's K (or V) of one KV head takes in a cache of `dtype`, scale included
    (`kv_format`'s arithmetic, the one the controller and the planner use)."""
    name = next((name for name, quantized in _QUANTIZED.items() if quantized == dtype), "auto")
    return kv_format.bytes_per_token_head(head_size, dtype.itemsize, name)


def round_to_fp8_grid(y: torch.Tensor) -> torch.Tensor:
    """fp32 `y` (|y| <= FP8_MAX) rounded to the nearest e4m3 value, ties away from zero: the
    grid step is 2^(exponent - 3), the exponent read from the fp32 bits (never below e4m3's -6)."""
    magnitude = y.abs()
    exponent = ((magnitude.view(torch.int32) >> 23) & 0xFF) - 127
    exponent = exponent.clamp(min=FP8_MIN_EXPONENT)
    step = ((exponent - FP8_MANTISSA_BITS + 127) << 23).view(torch.float32)
    return torch.floor(magnitude / step + 0.5) * step * torch.sign(y)


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales of `x` `[..., head_dim]` for a cache of quantized `dtype`: codes like
    `x` in `dtype`, scales `x.shape[:-1]` in SCALE_DTYPE; `codes * scale` approximates `x`."""
    values = x.float()
    limit = code_max(dtype)
    scale = (values.abs().amax(dim=-1) / limit).clamp(MIN_SCALE, MAX_SCALE).to(SCALE_DTYPE)
    y = (values / scale.float()[..., None]).clamp(-limit, limit)
    if dtype == torch.int8:
        codes = (torch.floor(y.abs() + 0.5) * torch.sign(y)).to(torch.int8)
    else:
        codes = round_to_fp8_grid(y).to(dtype)
    return codes, scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`codes * scale` in `dtype` (computed in fp32): the values a quantized cache stands for."""
    return (codes.float() * scale.float()[..., None]).to(dtype)
