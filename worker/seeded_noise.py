"""Exponential noise for seeded requests, drawn for all of them in one pass on the device.

A seeded request's noise must depend on its seed and its token position only, never on
the batch around it or on which device or run draws it. Each (row, vocab entry) gets
splitmix64 of a counter: the row's key (a hash of seed and output position, made on the
host) plus the vocab index times splitmix64's increment; that is, entry v of a row is
output v+1 of a splitmix64 stream seeded with the row key. Integer tensor ops compute it
in int64, whose multiplication and addition wrap as uint64's would (the low 64 bits are
the same); right shifts are made logical by masking.
"""
from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _splitmix64(x: int) -> int:
    x = (x + _GAMMA) & _MASK64
    x = ((x ^ (x >> 30)) * _MIX1) & _MASK64
    x = ((x ^ (x >> 27)) * _MIX2) & _MASK64
    return x ^ (x >> 31)


def as_int64(x: int) -> int:
    """The int64 with the bits of uint64 `x`."""
    return x - (1 << 64) if x >= 1 << 63 else x


def row_seed(seed: int, step: int) -> int:
    """The noise key (uint64) of output token number `step` of a request seeded with `seed`.

    A function of (seed, step) only, so a seeded request draws the same noise whatever
    else is in the batch and after recompute preemption (which keeps its outputs)."""
    return _splitmix64(_splitmix64(seed) ^ step)


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 words (torch's is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def seeded_exponentials(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) noise `[len(keys), vocab]` float32 on `keys`' device; row i from the int64 key
    `keys[i]` (`as_int64(row_seed(...))`) alone. Uniforms have 53 bits, so the small draws
    that decide the exponential race are not coarsely quantised."""
    counters = torch.arange(1, vocab + 1, dtype=torch.long, device=keys.device) * as_int64(_GAMMA)
    z = keys[:, None] + counters[None, :]
    z ^= _shift_right(z, 30)
    z *= as_int64(_MIX1)
    z ^= _shift_right(z, 27)
    z *= as_int64(_MIX2)
    z ^= _shift_right(z, 31)
    # 53 random bits → u in (0, 1]; -log(u) is Exp(1) (u = 1 gives 0, clamped by the caller).
    uniform = (_shift_right(z, 11) + 1).double().mul_(2.0 ** -53)
    return uniform.log_().neg_().float()
