"""The limits of every number a request carries, in the types it travels in.

A value that Python holds happily may not survive the wire: `top_k=2**31` does not fit
the int32 it travels in to the workers, `temperature=1e39` becomes inf as a float32, and
`top_p=1e-46` becomes 0. Each field's limit is therefore stated once, here, as the
narrowest wire type it crosses (the client API `quire.v1.Generate`, the worker contract
`quire.v1.Worker`) and the range the engine accepts; `SamplingParams.validate` checks
every field against this table, so the Python API, HTTP and gRPC refuse the same values
with the same message. Floats are range-checked after narrowing to float32, and a
non-zero value that narrows to zero is refused (a worker would see a different value
than the controller). Fields bounded by the model (token ids by the vocabulary) name it
in `model_bound`; the engine supplies the model's numbers.
"""
from __future__ import annotations

import math
import reprlib
import struct
from dataclasses import dataclass

INT32 = (-(2**31), 2**31 - 1)
UINT32 = (0, 2**32 - 1)
UINT64 = (0, 2**64 - 1)
_WIRE_INT_RANGES = {"int32": INT32, "uint32": UINT32, "uint64": UINT64}
_FLOAT32 = struct.Struct("<f")


def to_float32(value: float) -> float:
    """`value` as a float32 carries it: rounded to nearest, ±inf beyond float32's range."""
    try:
        return _FLOAT32.unpack(_FLOAT32.pack(value))[0]
    except OverflowError:  # struct refuses finite values beyond float32 instead of rounding them to inf
        return math.copysign(math.inf, value)


@dataclass(frozen=True)
class Limit:
    """One field: the wire type it travels in, the closed range [low, high] the engine accepts
    (`low_open`: low itself is refused), and what else bounds it."""

    field: str
    wire: str                       # int32 | uint32 | uint64 | float32
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    model_bound: str = ""           # e.g. "< vocab_size", checked against the served model
    note: str = ""

    def range_text(self) -> str:
        low = "-inf" if self.low is None else _number(self.low)
        high = "+inf" if self.high is None else _number(self.high)
        text = f"{'(' if self.low_open else '['}{low}, {high}]"
        return f"{text} and {self.model_bound}" if self.model_bound else text

    def check(self, value, *, element: bool = False) -> None:
        """Raise ValueError naming the field unless `value` travels in `wire` and lies in range."""
        if self.wire == "float32":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self._refuse(value, "must be a number", element)
            narrowed = to_float32(float(value))
            if not math.isfinite(narrowed):
                self._refuse(value, "must be a finite float32 (|x| < 3.4e38)", element)
            if narrowed == 0 and value != 0:
                self._refuse(value, "underflows to 0 as a float32 (use 0 or a value >= 1.2e-38)", element)
            value = narrowed
        else:
            if isinstance(value, bool) or not isinstance(value, int):
                self._refuse(value, "must be an integer", element)
            wire_low, wire_high = _WIRE_INT_RANGES[self.wire]
            if not wire_low <= value <= wire_high:
                self._refuse(value, f"does not fit its wire type {self.wire} [{wire_low}, {wire_high}]", element)
        if (self.low is not None and (value < self.low or (self.low_open and value == self.low))) \
                or (self.high is not None and value > self.high):
            self._refuse(value, f"must be in {self.range_text()}", element)

    def _refuse(self, value, why: str, element: bool):
        what = "elements" if element else ""
        raise ValueError(f"sampling params: `{self.field}` {what + ' ' if what else ''}{why} (got {shown(value)})")


_SHOWN = reprlib.Repr()
_SHOWN.maxstring, _SHOWN.maxlist, _SHOWN.maxlong, _SHOWN.maxother = 80, 8, 60, 80


def shown(value) -> str:
    """`repr(value)` cut to a readable length: a refusal quotes what it refused, not megabytes of it."""
    return _SHOWN.repr(value)


def _number(value: float) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and abs(value) >= 2**20:
        exponent = round(math.log2(abs(value) + 1))
        if abs(value) in (2**exponent - 1, 2**exponent):
            return f"{'-' if value < 0 else ''}2^{exponent}{' - 1' if abs(value) == 2**exponent - 1 else ''}"
    return str(value)


# Every number of a request. `n` is capped further by the HTTP API (16, as OpenAI's is small).
SAMPLING_LIMITS: dict[str, Limit] = {limit.field: limit for limit in (
    Limit("n", "uint32", 1, 64, note="parallel samples (HTTP: at most 16)"),
    Limit("max_tokens", "uint32", 1, UINT32[1], note="generation also stops at max_model_len"),
    Limit("temperature", "float32", 0, None, note="0 is greedy"),
    Limit("top_p", "float32", 0, 1, low_open=True),
    Limit("top_k", "int32", -1, INT32[1], note="-1 or 0 disables it"),
    Limit("min_p", "float32", 0, 1),
    Limit("seed", "uint64", 0, UINT64[1], note="sample i of n uses (seed + i) mod 2^64"),
    Limit("presence_penalty", "float32", -2, 2),
    Limit("frequency_penalty", "float32", -2, 2),
    Limit("repetition_penalty", "float32", 0, None, low_open=True, note="1 is off"),
    Limit("logprobs", "int32", 0, 20, note="top logprobs per token (HTTP chat: `top_logprobs`)"),
    Limit("stop_token_ids", "int32", 0, INT32[1], model_bound="< vocab_size", note="each element"),
)}
# How many stop strings and stop token ids one request may carry: each is checked against every
# generated token on the controller's one thread, so an unbounded list would slow every request.
MAX_STOP_STRINGS = 64
MAX_STOP_TOKEN_IDS = 1024
# Prompt token ids travel as int32 to the workers and are bounded by the model's vocabulary.
PROMPT_TOKEN_LIMIT = Limit("prompt", "int32", 0, INT32[1], model_bound="< vocab_size",
                           note="token ids; prompt + 1 <= max_model_len")


def limits_table() -> str:
    """The Markdown table of every limit (the README's API section shows it)."""
    rows = ["| field | travels as | accepted range | note |", "|---|---|---|---|"]
    for limit in (*SAMPLING_LIMITS.values(), PROMPT_TOKEN_LIMIT):
        rows.append(f"| `{limit.field}` | {limit.wire} | {limit.range_text()} | {limit.note} |")
    rows.append(f"| `stop` | strings | at most {MAX_STOP_STRINGS}, each non-empty | also `stop_token_ids`: "
                f"at most {MAX_STOP_TOKEN_IDS} |")
    return "\n".join(rows)
