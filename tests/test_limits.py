"""The limits of every number a request carries (`quire.protos.limits`) match the wire:
whatever `SamplingParams` accepts encodes exactly into both protobuf contracts, whatever
would not encode (or would change on the way) is refused naming the field, and the
README's table is the table the code checks."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quire.protos import generate_pb2, worker_pb2
from quire.protos.limits import INT32, SAMPLING_LIMITS, UINT64, limits_table, to_float32
from quire.protos.step import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

EDGES = [0, 1, -1, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**32 - 1, 2**32, 2**63, 2**64 - 1, 2**64, -(2**63)]
any_int = st.one_of(st.sampled_from(EDGES), st.integers(), st.integers(-(2**70), 2**70))
any_float = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(width=32),
                      st.sampled_from([1e39, -1e39, 3.4028235e38, 3.5e38, 1e-46, -1e-46, 1.4e-45, 1.2e-38, 1e-30,
                                       -0.0, 0.0, 2.0000001, 1.0000000001]))
INT_FIELDS = [name for name, limit in SAMPLING_LIMITS.items() if limit.wire != "float32" and name != "stop_token_ids"]
FLOAT_FIELDS = [name for name, limit in SAMPLING_LIMITS.items() if limit.wire == "float32"]
# Where each field travels: (message class, field name there); None: the client API does not carry it.
WIRE = {"n": (generate_pb2.SamplingOptions, "n"), "max_tokens": (generate_pb2.SamplingOptions, "max_tokens"),
        "seed": (worker_pb2.SamplingParams, "seed"), "top_k": (worker_pb2.SamplingParams, "top_k"),
        "logprobs": (worker_pb2.SamplingParams, "logprobs")}


def accepted(**fields) -> SamplingParams | None:
    try:
        return SamplingParams(**fields)
    except ValueError as error:
        name = next(iter(fields))
        assert f"`{name}`" in str(error), error
        return None


@SETTINGS
@given(name=st.sampled_from(INT_FIELDS), value=any_int)
def test_an_integer_is_accepted_exactly_when_it_fits_its_wire_type_and_range(name, value):
    params = accepted(**{name: value})
    limit = SAMPLING_LIMITS[name]
    in_range = limit.low <= value <= limit.high
    assert (params is not None) == in_range, (name, value)
    if params is not None:  # it travels unchanged in both contracts
        message_cls, wire_name = WIRE[name]
        assert getattr(message_cls(**{wire_name: value}), wire_name) == value
        if message_cls is worker_pb2.SamplingParams:
            received = SamplingParams.from_pb(worker_pb2.SamplingParams.FromString(params.to_pb().SerializeToString()))
            assert getattr(received, name) == value


@SETTINGS
@given(name=st.sampled_from(FLOAT_FIELDS), value=any_float)
def test_a_float_is_accepted_only_when_float32_carries_it_and_it_stays_in_range(name, value):
    params = accepted(**{name: value})
    narrowed = to_float32(value) if math.isfinite(value) else value
    if params is None:
        return
    assert math.isfinite(narrowed) and (narrowed != 0 or value == 0), (name, value)
    on_the_wire = getattr(worker_pb2.SamplingParams.FromString(params.to_pb().SerializeToString()), name)
    assert on_the_wire == narrowed  # the worker sees the value the controller checked
    limit = SAMPLING_LIMITS[name]
    assert limit.low is None or on_the_wire >= limit.low
    assert limit.high is None or on_the_wire <= limit.high


@SETTINGS
@given(st.lists(any_int, max_size=4), st.integers(1, 2**31 - 1))
def test_stop_token_ids_are_int32_and_inside_the_vocabulary(token_ids, vocab_size):
    try:
        SamplingParams(stop_token_ids=token_ids).validate(vocab_size=vocab_size)
    except ValueError as error:
        assert "`stop_token_ids`" in str(error)
        assert any(not 0 <= t < vocab_size for t in token_ids)
    else:
        assert all(0 <= t < vocab_size for t in token_ids)
        assert list(generate_pb2.SamplingOptions(stop_token_ids=token_ids).stop_token_ids) == token_ids


@pytest.mark.parametrize("fields, name", [
    (dict(top_k=2**31), "top_k"), (dict(top_k=True), "top_k"), (dict(seed=2**64), "seed"), (dict(seed=-1), "seed"),
    (dict(temperature=1e39), "temperature"), (dict(top_p=1e-46), "top_p"), (dict(temperature=1e-46), "temperature"),
    (dict(max_tokens=2**32), "max_tokens"), (dict(n=0), "n"), (dict(logprobs=21), "logprobs"),
    (dict(repetition_penalty=1e-50), "repetition_penalty"), (dict(presence_penalty=float("inf")), "presence_penalty"),
    (dict(min_p="0.5"), "min_p"), (dict(ignore_eos="yes"), "ignore_eos"),
])
def test_refusals_name_the_field(fields, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        SamplingParams(**fields)


def test_per_sample_seeds_stay_uint64():
    params = SamplingParams(seed=UINT64[1], n=3)
    assert [params.for_sample(i).seed for i in range(3)] == [UINT64[1], 0, 1]
    assert SamplingParams(seed=5, n=2).for_sample(1).seed == 6


def test_the_readme_shows_the_limits_the_code_checks():
    assert limits_table() in (ROOT / "README.md").read_text(), \
        "README's limits table differs from quire.protos.limits.limits_table(); paste the new one"
    assert re.search(r"\| `top_k` \| int32 \| \[-1, 2\^31 - 1\]", limits_table())
    assert INT32[1] == 2**31 - 1
