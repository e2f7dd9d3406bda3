"""No request may hurt another: a request that fails inside a step (its row of the sampler,
its detokenisation) ends alone with an error, the rest of its batch goes on token for
token, its blocks are freed, and the engine serves later requests. Values that would not
survive the wire are refused at the edge, naming the field."""
from __future__ import annotations

import pytest

from quire.cluster import LLM, SamplingParams
from quire.cluster.core.detokenizer import IncrementalDetokenizer
from quire.cluster.core.outputs import OutputAccumulator
from quire.worker.sampler import Sampler

# A valid value the injected fault below treats as poison: it stands for any value that
# fails in a request's own row of the sampler (a logits processor's bug, say).
POISON_TOP_K = 4242
PROMPTS = [[5 + i, 17, 29 + 3 * i, 41, 8] for i in range(7)]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async-scheduling"])
def llm(request, tiny_checkpoint):
    llm = LLM(model=str(tiny_checkpoint("llama-gqa4")), num_kv_blocks=64, max_model_len=128,
              async_scheduling=request.param)
    yield llm
    llm.shutdown()


def drain(engine) -> dict:
    """Step until idle, checking the block manager after every step; each request's deltas folded whole."""
    received = {}
    while engine.has_unfinished():
        for delta in engine.step():
            received.setdefault(delta.request_id, OutputAccumulator()).add(delta)
        engine.scheduler.check_integrity()
    return {request_id: accumulator.result() for request_id, accumulator in received.items()}


def assert_idle(engine) -> None:
    engine.scheduler.check_integrity()
    assert engine.kv.num_used_blocks == 0 and not engine.scheduler.requests and not engine.detokenizers


@pytest.fixture
def poisoned_sampler(monkeypatch):
    real = Sampler.process_logits

    def process_logits(self, logits, rows):
        if any(row.params.top_k == POISON_TOP_K for row in rows):
            raise RuntimeError("injected failure of a logits processor")
        return real(self, logits, rows)

    monkeypatch.setattr(Sampler, "process_logits", process_logits)


def greedy_run(engine, prompts) -> dict[str, list[int]]:
    ids = [engine.add_request(prompt, GREEDY) for prompt in prompts]
    finals = drain(engine)
    return {request_id: finals[request_id].outputs[0].token_ids for request_id in ids}


def test_a_request_failing_in_its_sampler_row_fails_alone(llm, poisoned_sampler):
    engine = llm.engine
    alone = list(greedy_run(engine, PROMPTS).values())
    assert_idle(engine)

    # The bad request comes first, so it shares every step with the seven good ones.
    bad = engine.add_request([7, 7, 7, 7], SamplingParams(temperature=0.8, top_k=POISON_TOP_K, max_tokens=12))
    good = [engine.add_request(prompt, GREEDY) for prompt in PROMPTS]
    finals = drain(engine)
    failed = finals[bad]
    assert failed.finished and failed.outputs[0].finish_reason == "error"
    assert "injected failure of a logits processor" in failed.error
    assert failed.outputs[0].token_ids == []  # it never got a token
    assert [finals[request_id].outputs[0].token_ids for request_id in good] == alone
    assert all(finals[request_id].error is None and len(finals[request_id].outputs[0].token_ids) == 12
               for request_id in good)
    assert engine.stats.finished["error"] >= 1
    assert_idle(engine)

    # Later requests are served as before.
    assert list(greedy_run(engine, PROMPTS[:2]).values()) == alone[:2]
    assert_idle(engine)


def test_a_request_failing_mid_stream_keeps_its_tokens_and_others_go_on(llm, monkeypatch):
    """A failure after some tokens (here: its detokenisation, on the controller) ends that
    request with the tokens it had; the others finish as if it had never been there."""
    engine = llm.engine
    alone = list(greedy_run(engine, PROMPTS[:3]).values())
    real_append = IncrementalDetokenizer.append
    calls: dict[int, int] = {}

    def append(self, token_ids):
        calls[id(self)] = calls.get(id(self), 0) + 1
        if self._stops == ["<poison>"] and calls[id(self)] == 4:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return real_append(self, token_ids)

    monkeypatch.setattr(IncrementalDetokenizer, "append", append)
    bad = engine.add_request([9, 9, 9], SamplingParams(temperature=0, max_tokens=12, stop=["<poison>"]))
    good = [engine.add_request(prompt, GREEDY) for prompt in PROMPTS[:3]]
    finals = drain(engine)
    assert finals[bad].outputs[0].finish_reason == "error" and "UnicodeDecodeError" in finals[bad].error
    assert len(finals[bad].outputs[0].token_ids) == 4  # the tokens it had when it failed
    assert [finals[request_id].outputs[0].token_ids for request_id in good] == alone
    assert_idle(engine)


def test_a_row_without_a_distribution_fails_alone(llm, monkeypatch):
    """Logits a row cannot sample from (NaN, here injected for one row) fail that row only."""
    engine = llm.engine
    alone = list(greedy_run(engine, PROMPTS[:2]).values())
    real = Sampler.process_logits

    def process_logits(self, logits, rows):
        out = real(self, logits, rows).clone()
        for i, row in enumerate(rows):
            if row.params.top_k == POISON_TOP_K:
                out[i, 3] = float("nan")
        return out

    monkeypatch.setattr(Sampler, "process_logits", process_logits)
    bad = engine.add_request([4, 4, 4], SamplingParams(temperature=0, top_k=POISON_TOP_K, max_tokens=5))
    good = [engine.add_request(prompt, GREEDY) for prompt in PROMPTS[:2]]
    finals = drain(engine)
    assert "no valid distribution" in finals[bad].error
    assert [finals[request_id].outputs[0].token_ids for request_id in good] == alone
    assert_idle(engine)


@pytest.mark.parametrize("params", [
    dict(temperature=1e-30, seed=1),            # logits / temperature overflows float32
    dict(temperature=1.2e-38, seed=2),          # the smallest normal float32
    dict(repetition_penalty=1e-30, seed=3),     # seen tokens' logits overflow
    dict(repetition_penalty=3e38, seed=4, temperature=0.5),
    dict(temperature=3e38, top_p=1e-30, seed=5),
    dict(temperature=1e-30, presence_penalty=-2, frequency_penalty=-2, repetition_penalty=1e-30, min_p=1, seed=6),
])
def test_extreme_values_inside_the_limits_still_sample(llm, params):
    """Every value the limits accept yields tokens: the sampler never overflows into NaN."""
    engine = llm.engine
    request_id = engine.add_request([5, 6, 7, 5, 6, 7], SamplingParams(max_tokens=6, ignore_eos=True, **params))
    output = drain(engine)[request_id]
    assert output.error is None and len(output.outputs[0].token_ids) == 6
    assert all(0 <= t < engine.info.vocab_size for t in output.outputs[0].token_ids)
    assert_idle(engine)


def test_tiny_temperature_samples_the_greedy_token(llm):
    engine = llm.engine
    greedy = engine.add_request(PROMPTS[0], GREEDY)
    tiny = engine.add_request(PROMPTS[0], SamplingParams(temperature=1e-30, max_tokens=12, ignore_eos=True, seed=9))
    finals = drain(engine)
    assert finals[tiny].outputs[0].token_ids == finals[greedy].outputs[0].token_ids

