"""Engine behaviour: bad input is refused with the field named while others keep being
served and no block leaks; stops; seeds; streaming text never splits a character."""
import pytest

from quire.cluster import LLM, SamplingParams
from quire.cluster.core.outputs import OutputAccumulator
from quire.cluster.core.request import RequestStatus


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(model=str(tiny_checkpoint("llama-gqa4")), dtype="float32", num_kv_blocks=64, max_model_len=128)


def drain(engine, earlier=()):
    """Step until idle; each request's deltas (`earlier` ones first) folded into its whole
    output, in the order requests finished."""
    received, finished = {}, []

    def fold(deltas):
        for delta in deltas:
            received.setdefault(delta.request_id, OutputAccumulator()).add(delta)
            if delta.finished:
                finished.append(received.pop(delta.request_id).result())

    fold(earlier)
    while engine.has_unfinished():
        fold(engine.step())
    return finished


@pytest.mark.parametrize("prompt, params, field", [
    ("", SamplingParams(), "prompt"),
    ([], SamplingParams(), "prompt"),
    ([5] * 200, SamplingParams(), "prompt"),                   # longer than max_model_len
    ([5, 10**6], SamplingParams(), "prompt"),                  # outside the vocabulary
    ([5, -1], SamplingParams(), "prompt"),
    ("hello", dict(max_tokens=0), "max_tokens"),
    ("hello", dict(top_p=0.0), "top_p"),
    ("hello", dict(top_p=1.5), "top_p"),
    ("hello", dict(temperature=-0.5), "temperature"),
    ("hello", dict(temperature=float("nan")), "temperature"),
])
def test_bad_input_names_the_field_and_harms_nobody(llm, prompt, params, field):
    engine = llm.engine
    good = engine.add_request([5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    first = engine.step()  # the good request is running when the bad one arrives
    with pytest.raises(ValueError, match=f"`{field}`"):
        engine.add_request(prompt, params if isinstance(params, SamplingParams) else SamplingParams(**params))
    outputs = [o for o in drain(engine, first) if o.request_id == good]
    assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 6
    engine.kv.check_integrity()
    assert engine.kv.num_used_blocks == 0 and not engine.scheduler.requests


def test_unknown_model_path_and_unsupported_architecture(tmp_path, tiny_checkpoint):
    with pytest.raises(ValueError, match="`model`"):
        LLM(model=str(tmp_path / "nowhere"))
    import json
    import shutil

    fake = tmp_path / "fake"
    shutil.copytree(tiny_checkpoint("llama-mha"), fake)
    config = json.loads((fake / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (fake / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
        LLM(model=str(fake), num_kv_blocks=8)


def test_request_larger_than_the_whole_cache_is_refused_not_hung(tiny_checkpoint):
    small = LLM(model=str(tiny_checkpoint("llama-gqa4")), dtype="float32", num_kv_blocks=4, max_model_len=128)
    with pytest.raises(ValueError, match="`max_tokens`.*needs 7 KV blocks; the cache holds 4"):
        small.generate([5] * 10, SamplingParams(max_tokens=100), use_tqdm=False)
    assert small.generate([5] * 10, SamplingParams(max_tokens=50, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].finish_reason == "length"


def test_greedy_equivalents_and_seeds(llm):
    prompt = [9, 8, 7, 6, 5]
    greedy = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    top1 = llm.generate(prompt, SamplingParams(temperature=0.8, top_k=1, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)
    assert greedy[0].outputs[0].token_ids == top1[0].outputs[0].token_ids
    seeded = SamplingParams(temperature=1.5, max_tokens=12, seed=1234, ignore_eos=True)
    # same seed → same tokens, even when batched beside other requests
    alone = llm.generate(prompt, seeded, use_tqdm=False)[0].outputs[0].token_ids
    batched = llm.generate([[1, 2, 3], prompt, [4, 4]], [SamplingParams(temperature=1.0, max_tokens=5), seeded,
                                                         SamplingParams(temperature=0, max_tokens=20)],
                           use_tqdm=False)[1].outputs[0].token_ids
    assert alone == batched
    other = llm.generate(prompt, SamplingParams(temperature=1.5, max_tokens=12, seed=4321, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0].token_ids
    assert other != alone


def test_stop_token_ids_stop_strings_and_logprobs(llm):
    prompt = [11, 12, 13]
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)[0]
    tokens = free.outputs[0].token_ids
    stopped = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                  stop_token_ids=[tokens[3]]), use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == tokens[:tokens.index(tokens[3]) + 1]
    text = free.outputs[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop and cut.text == text[:text.index(stop)]
    with_logprobs = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3),
                                 use_tqdm=False)[0].outputs[0]
    assert len(with_logprobs.logprobs) == 4
    for token, entry in zip(with_logprobs.token_ids, with_logprobs.logprobs):
        assert next(iter(entry)) == token and len(entry) >= 3
        assert max(entry.values()) == entry[token]  # greedy picks the most likely token


def test_abort_mid_generation_frees_blocks(llm):
    engine = llm.engine
    keep = engine.add_request([3, 4, 5], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    gone = engine.add_request([3, 4, 5, 6], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.abort(gone) and not engine.abort(gone)
    outputs = drain(engine)
    assert all(o.request_id == keep for o in outputs)
    assert engine.kv.num_used_blocks == 0


def test_streamed_text_never_holds_a_broken_character(llm):
    tokenizer = llm.get_tokenizer()
    engine = llm.engine
    prompt = "naïve café — 你好世界 🙂🚀"
    ids = tokenizer.encode(prompt)
    # Force the output to be the prompt's own multi-byte tokens by making them the only
    # ones allowed: feed them back one by one as the prompt grows.
    target = [t for t in ids if t != tokenizer.bos_token_id]
    assert any("\ufffd" in tokenizer.decode([t]) for t in target), "the prompt must split characters"
    request_id = engine.add_request([5], SamplingParams(temperature=0, max_tokens=len(target), ignore_eos=True))
    request = engine.scheduler.requests[request_id]
    detok = engine.detokenizers[request_id]
    deltas = []
    for token in target:
        request.output_token_ids.append(token)
        out = engine._process_token(request, token)
        deltas.append(out.text)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(target)
    assert request.status is RequestStatus.FINISHED_LENGTH and detok.output_text == tokenizer.decode(target)
    assert engine.kv.num_used_blocks == 0


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path, tiny_checkpoint):
    import transformers

    source = tiny_checkpoint("qwen2-bias")
    model = transformers.AutoModelForCausalLM.from_pretrained(source)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    transformers.AutoTokenizer.from_pretrained(source).save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompts = [[7, 8, 9], [100, 200, 300, 400, 500]]
    single = LLM(model=str(source), dtype="float32", num_kv_blocks=16).generate(prompts, params, use_tqdm=False)
    split = LLM(model=str(sharded), dtype="float32", num_kv_blocks=16).generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in split] == [o.outputs[0].token_ids for o in single]


def test_a_placeholder_token_is_the_one_this_worker_sampled_last(tiny_checkpoint):
    """Asynchronous scheduling's contract on the worker: -1 in a plan stands for the token the
    worker sampled for that request in the step before; without one that request is refused."""
    from quire.protos.step import PLACEHOLDER_TOKEN, NewRequestData, StepPlan

    # An engine of its own: the plans below write into blocks its scheduler does not know of.
    llm = LLM(model=str(tiny_checkpoint("llama-gqa4")), dtype="float32", num_kv_blocks=64, max_model_len=128)
    runner = llm.engine.executor.worker.runner
    greedy = SamplingParams(temperature=0, max_tokens=4)
    handles = (10**9, 10**9 + 1)  # far from the engine's own handles
    first = runner.execute(StepPlan(1, new_requests=[NewRequestData(handles[0], "a", [5, 6, 7], greedy, [60], 0)],
                                    num_scheduled_tokens={handles[0]: 3}))
    second = runner.execute(StepPlan(2, decode_handles=[handles[0]], decode_token_ids=[PLACEHOLDER_TOKEN]))
    assert runner.requests[handles[0]].output_token_ids == first.sampled_token_ids
    explicit = runner.execute(StepPlan(3, finished_handles=[handles[0]], new_requests=[
        NewRequestData(handles[1], "b", [5, 6, 7, *first.sampled_token_ids], greedy, [61], 0)],
        num_scheduled_tokens={handles[1]: 4}))
    assert explicit.sampled_token_ids == second.sampled_token_ids, "the placeholder computed the sampled token"
    unsampled = handles[0] + 2  # sent, never computed: it has no sampled token to stand in for
    runner.execute(StepPlan(4, new_requests=[NewRequestData(unsampled, "c", [5, 6, 7], greedy, [62], 2)]))
    refused = runner.execute(StepPlan(5, decode_handles=[unsampled], decode_token_ids=[PLACEHOLDER_TOKEN]))
    assert "placeholder" in refused.errors[unsampled] and not refused.sampled_handles  # it fails alone
    assert unsampled not in runner.requests
    runner.execute(StepPlan(6, finished_handles=[handles[1], unsampled]))
    assert not {*handles, unsampled} & set(runner.requests)
    llm.shutdown()


def test_async_scheduling_drops_the_token_planned_past_a_stop(tiny_checkpoint):
    """A request that stops on a token was already planned into the next step: that token is
    dropped, the outputs equal synchronous scheduling's, and no step is left in flight."""
    path = str(tiny_checkpoint("llama-gqa4"))
    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    sync = LLM(model=path, dtype="float32", num_kv_blocks=64, async_scheduling=False)
    reference = [o.outputs[0].token_ids for o in sync.generate(prompts, free, use_tqdm=False)]
    stopping = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[tokens[4]])
                for tokens in reference]
    expected = [o.outputs[0] for o in sync.generate(prompts, stopping, use_tqdm=False)]
    sync.shutdown()
    llm = LLM(model=path, dtype="float32", num_kv_blocks=64, async_scheduling=True)
    engine = llm.engine
    planned = []
    real_schedule = engine.scheduler.schedule

    def schedule():
        plan = real_schedule()
        planned.append(len(plan.decode_handles) + len(plan.num_scheduled_tokens))
        return plan

    engine.scheduler.schedule = schedule
    outputs = [o.outputs[0] for o in llm.generate(prompts, stopping, use_tqdm=False)]
    assert [(o.token_ids, o.finish_reason) for o in outputs] == [(e.token_ids, e.finish_reason) for e in expected]
    assert all(o.finish_reason == "stop" and len(o.token_ids) <= 5 for o in outputs)
    assert sum(planned) > sum(len(o.token_ids) for o in outputs), "steps were planned past the stops"
    assert not engine.has_unfinished() and not engine._in_flight and not engine.executor._results
    engine.scheduler.check_integrity()
    assert engine.kv.num_used_blocks == 0
    llm.shutdown()
