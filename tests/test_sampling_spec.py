"""The worker's side of a request (protos/step.py): `SamplingSpec`, exactly what a worker
samples with, crosses the wire unchanged and is refused there when out of its limits;
`TokenSequence`, the token arithmetic the controller's Request and the worker's
RequestState share."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quire.cluster.core.request import Request
from quire.protos import worker_pb2 as pb
from quire.protos.limits import INT32, UINT64
from quire.protos.step import NewRequestData, SamplingParams, SamplingSpec, StepPlan, TokenSequence
from quire.worker.model_runner import RequestState
from quire.worker.sampler import Sampler, SamplingRow

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def float32s(low: float, high: float, exclude_low: bool = False):
    """Floats the wire carries exactly, in [low, high] (no float32 subnormals: limits refuse what underflows)."""
    return st.floats(low, high, width=32, exclude_min=exclude_low, allow_subnormal=False)


# User-facing params within every limit, with the fields the worker never sees varied too.
valid_params = st.builds(
    SamplingParams,
    max_tokens=st.integers(1, 2**32 - 1), n=st.integers(1, 64), stop=st.lists(st.text(min_size=1), max_size=3),
    stop_token_ids=st.lists(st.integers(0, INT32[1]), max_size=3), ignore_eos=st.booleans(),
    temperature=float32s(0, 2.0**100), top_p=float32s(0, 1, exclude_low=True), top_k=st.integers(-1, INT32[1]),
    min_p=float32s(0, 1), seed=st.none() | st.integers(*UINT64), logprobs=st.none() | st.integers(0, 20),
    presence_penalty=float32s(-2, 2), frequency_penalty=float32s(-2, 2),
    repetition_penalty=float32s(0, 2.0**100, exclude_low=True),
)


def over_the_wire(spec: SamplingSpec) -> SamplingSpec:
    return SamplingSpec.from_pb(pb.SamplingParams.FromString(spec.to_pb().SerializeToString()))


@SETTINGS
@given(valid_params)
def test_a_spec_round_trips_through_the_wire_unchanged(params):
    spec = SamplingSpec.from_params(params)
    assert over_the_wire(spec) == spec
    for name in (f.name for f in dataclasses.fields(SamplingSpec)):
        assert getattr(spec, name) == getattr(params, name), name
    assert spec.greedy == params.greedy
    assert params.to_pb() == spec.to_pb(), "the params' wire form is their spec's"


@SETTINGS
@given(valid_params, st.lists(st.integers(0, 100), max_size=5))
def test_a_new_request_carries_only_the_spec(params, prompt):
    sent = NewRequestData(3, "r", prompt, SamplingSpec.from_params(params), [1, 2], 0)
    assert NewRequestData.from_pb(pb.NewRequest.FromString(sent.to_pb().SerializeToString())) == sent
    # Given the user's params, it keeps their spec alone (so a plan equals itself after the wire).
    assert NewRequestData(3, "r", prompt, params, [1, 2], 0) == sent


def test_the_spec_is_exactly_the_wire_message():
    wire_fields = set(pb.SamplingParams.DESCRIPTOR.fields_by_name)
    assert {f.name for f in dataclasses.fields(SamplingSpec)} | {"has_seed"} == wire_fields
    assert SamplingSpec() == SamplingSpec.from_params(SamplingParams()), "the same defaults"
    assert over_the_wire(SamplingSpec(seed=0, logprobs=0)) == SamplingSpec(seed=0, logprobs=0), "0 is not None"


@pytest.mark.parametrize("fields, name", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(min_p=2.0), "min_p"), (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(logprobs=21), "logprobs"),
    (dict(temperature=float("nan")), "temperature"),
])
def test_the_worker_refuses_a_spec_outside_its_limits(fields, name):
    """The wire is the worker's boundary: what the controller would refuse, the worker refuses
    too, naming the field, as `SamplingParams.validate` does."""
    message = dataclasses.replace(SamplingSpec(), **fields).to_pb()
    with pytest.raises(ValueError, match=f"`{name}`"):
        SamplingSpec.from_pb(message)
    with pytest.raises(ValueError, match=f"`{name}`"):
        StepPlan.from_pb(pb.StepPlan(new_requests=[pb.NewRequest(handle=1, sampling_params=message)]))


def test_the_sampler_draws_the_same_from_a_spec_as_from_its_params():
    params = [SamplingParams(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05, seed=7, logprobs=2,
                             repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2, stop=["x"]),
              SamplingParams(temperature=0, max_tokens=3), SamplingParams(temperature=1.2, seed=11)]
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    prompt, output = [1, 2, 3, 2], [4, 4, 9]
    by_params = Sampler(5)(logits, [SamplingRow(p, prompt, output) for p in params])
    by_spec = Sampler(5)(logits, [SamplingRow(SamplingSpec.from_params(p), prompt, output) for p in params])
    assert by_spec == by_params


token_lists = st.lists(st.integers(0, 1000), max_size=12)


@SETTINGS
@given(token_lists, token_lists, st.data())
def test_token_slices_read_prompt_then_outputs_on_both_sides(prompt, output, data):
    request = Request("r", list(prompt), SamplingParams(), output_token_ids=list(output))
    state = RequestState(1, "r", list(prompt), list(output), SamplingSpec(), [], 0)
    whole = prompt + output
    start = data.draw(st.integers(0, len(whole)))
    end = data.draw(st.integers(start, len(whole)))
    for sequence in (request, state):
        assert isinstance(sequence, TokenSequence)
        assert sequence.num_tokens == len(whole)
        assert sequence.token_slice(start, end) == whole[start:end]
        assert sequence.tokens_from(start) == whole[start:]


def test_a_token_sequence_adds_no_field():
    assert [f.name for f in dataclasses.fields(RequestState)][:5] == [
        "handle", "request_id", "prompt_token_ids", "output_token_ids", "params"]
    assert not hasattr(TokenSequence, "__dataclass_fields__")
    assert Request("r", [1], SamplingParams()) != Request("r", [1], SamplingParams()), "still an entity (eq=False)"
