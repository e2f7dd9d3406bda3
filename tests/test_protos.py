"""The committed generated code matches the .proto files, and messages round-trip."""
from pathlib import Path

from quire.protos import worker_pb2 as pb
from quire.protos.step import (CachedRequestData, NewRequestData, SampledLogprobs, SamplingParams, StepPlan,
                               StepResult)

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path, load_script):
    written = load_script("scripts/gen_protos.py").generate(tmp_path)
    assert written, "no protos were generated"
    for fresh in written:
        committed = ROOT / "protos" / fresh.name
        assert committed.exists(), f"{fresh.name} is not committed; run `make protos`"
        assert committed.read_bytes() == fresh.read_bytes(), f"{fresh.name} is stale; run `make protos`"


def test_step_plan_round_trips_through_the_wire():
    plan = StepPlan(
        step_id=7,
        new_requests=[NewRequestData(1, "a", [1, 2, 3], SamplingParams(temperature=0.5, seed=3, logprobs=2), [4, 9], 0)],
        cached_requests=[CachedRequestData(2, [11], [5], 40, replace_table=True)],
        num_scheduled_tokens={1: 3, 2: 1},
        finished_handles=[3],
        decode_handles=[4, 5],
        decode_token_ids=[12, 13],
    )
    parsed = StepPlan.from_pb(pb.StepPlan.FromString(plan.to_pb().SerializeToString()))
    assert parsed == plan
    assert parsed.scheduled() == [(4, 1), (5, 1), (1, 3), (2, 1)], "plain decodes come first in the batch"
    assert parsed.total_num_scheduled_tokens == 6 and parsed.num_scheduled_requests == 4


def test_step_result_round_trips_logprobs_only_when_present():
    result = StepResult(step_id=2, sampled_handles=[1, 2], sampled_token_ids=[5, 6],
                        logprobs={2: SampledLogprobs(-0.25, {6: -0.25, 1: -2.0})})
    parsed = StepResult.from_pb(pb.StepResult.FromString(result.to_pb().SerializeToString()))
    assert parsed == result
    assert list(parsed.logprobs) == [2] and list(parsed.logprobs[2].top_logprobs) == [6, 1]
