"""The OpenAI-compatible server (quire.cluster.serving.api_server) and its AsyncEngine, over loopback HTTP.

One in-process uvicorn server (port 0, background thread) serves the embedded default model
with a small KV cache for the whole module; every wait is bounded.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import uvicorn

from quire.cluster.serving.api_server import build_app
from quire.cluster.serving.async_engine import AsyncEngine, EngineDeadError
from quire.cluster.core.config import EngineConfig
from quire.cluster.core.engine import Engine
from quire.cluster.core.outputs import OutputAccumulator
from quire.cluster.tools.default_model import default_model_dir
from quire.protos.step import SamplingParams

MAX_MODEL_LEN = 512
LONG = 400  # max_tokens of requests that must still be running when aborted
PROMPT = "Hello world"
GREEDY = dict(max_tokens=8, temperature=0, ignore_eos=True)


def wait_for(predicate, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def cache_dir(tokenizer_dir):
    # conftest's session fixture builds the tiny random model into a temp cache once; point
    # QUIRE_DEFAULT_MODEL at it so default_model_dir() returns it (restored after the module).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUIRE_CACHE_DIR", str(tokenizer_dir.parent))
        mp.setenv("QUIRE_DEFAULT_MODEL", str(tokenizer_dir))  # the tiny random model, not the shipped one
        yield tokenizer_dir.parent


def make_engine() -> Engine:
    return Engine(EngineConfig.from_kwargs(model=str(default_model_dir()), num_kv_blocks=64, max_model_len=MAX_MODEL_LEN))


@pytest.fixture(scope="module")
def server(cache_dir):
    engine = AsyncEngine(make_engine())
    uv = uvicorn.Server(uvicorn.Config(build_app(engine), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=uv.run, name="test-uvicorn", daemon=True)
    thread.start()
    wait_for(lambda: uv.started or not thread.is_alive(), 30, "uvicorn startup")
    assert uv.started
    port = uv.servers[0].sockets[0].getsockname()[1]
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        yield SimpleNamespace(client=client, engine=engine, url=f"http://127.0.0.1:{port}")
    uv.should_exit = True
    thread.join(10)
    engine.shutdown()


@pytest.fixture
def idle(server):
    """Every test starts and ends with an idle engine holding no KV blocks."""
    yield server
    wait_for(lambda: server.engine.stats().num_running == server.engine.stats().num_waiting == 0, what="engine idle")
    wait_for(lambda: server.engine.stats().kv_usage == 0, what="KV blocks freed")


def complete(server, **body) -> dict:
    response = server.client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def stream_events(server, **body) -> list:
    """The SSE `data:` payloads of a streamed completion, `[DONE]` kept as a string."""
    events = []
    with server.client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                payload = line[len("data: "):]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
            else:
                assert line == "", line
    return events


def test_models_and_health(idle):
    models = idle.client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [idle.engine.model.name] == ["tiny-random-llama-v1"]
    health = idle.client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_completion_and_stream_agree(idle):
    tokenizer = idle.engine.model.tokenizer
    body = complete(idle, model=idle.engine.model.name, prompt=PROMPT, **GREEDY)
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "length" and choice["index"] == 0 and choice["text"]
    prompt_tokens = len(tokenizer.encode(PROMPT))
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 8, "total_tokens": prompt_tokens + 8}

    events = stream_events(idle, prompt=PROMPT, stream_options={"include_usage": True}, **GREEDY)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    *chunks, usage_chunk = events[:-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == body["usage"]
    assert all(c["usage"] is None and c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])

    plain = stream_events(idle, prompt=PROMPT, **GREEDY)  # no usage requested: none sent
    assert plain[-1] == "[DONE]" and all("usage" not in c for c in plain[:-1])


def test_token_id_and_list_of_one_prompts(idle):
    ids = idle.engine.model.tokenizer.encode(PROMPT)
    expected = complete(idle, prompt=PROMPT, **GREEDY)["choices"][0]["text"]
    for prompt in (ids, [ids], [PROMPT]):
        body = complete(idle, prompt=prompt, **GREEDY)
        assert body["choices"][0]["text"] == expected, prompt
        assert body["usage"]["prompt_tokens"] == len(ids)


def test_stop_string(idle):
    text = complete(idle, prompt=PROMPT, **GREEDY)["choices"][0]["text"]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    body = complete(idle, prompt=PROMPT, stop=[stop, "never-generated"], **GREEDY)
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["text"] == text[:text.index(stop)]
    streamed = stream_events(idle, prompt=PROMPT, stop=stop, **GREEDY)
    assert "".join(c["choices"][0]["text"] for c in streamed[:-1]) == text[:text.index(stop)]


def test_logprobs(idle):
    body = complete(idle, prompt=PROMPT, logprobs=2, **GREEDY)
    logprobs = body["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 8
    assert all(lp <= 0 for lp in logprobs["token_logprobs"])
    assert all(1 <= len(top) <= 3 for top in logprobs["top_logprobs"])
    # Greedy: the chosen token is the most likely one.
    assert all(lp == pytest.approx(max(top.values())) for lp, top in zip(logprobs["token_logprobs"],
                                                                         logprobs["top_logprobs"]))
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    streamed = stream_events(idle, prompt=PROMPT, logprobs=2, **GREEDY)
    tokens = [t for c in streamed[:-1] for t in c["choices"][0]["logprobs"]["tokens"]]
    assert tokens == logprobs["tokens"]
    assert [o for c in streamed[:-1] for o in c["choices"][0]["logprobs"]["text_offset"]] == offsets


def test_concurrent_requests(idle):
    async def run():
        async with httpx.AsyncClient(base_url=idle.url, timeout=30) as client:
            bodies = [dict(prompt=f"{PROMPT} {i}", **GREEDY) for i in range(4)]
            return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))

    for response in asyncio.run(run()):
        assert response.status_code == 200
        assert response.json()["usage"]["completion_tokens"] == 8


BAD_REQUESTS = [
    # (description, JSON body or raw bytes, status, field named in message and `param`)
    ("malformed JSON", b'{"prompt": "x", "max_tokens": ', 400, None),
    ("max_tokens wrong type", {"prompt": "x", "max_tokens": "eight"}, 400, "max_tokens"),
    ("max_tokens float", {"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
    ("negative max_tokens", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("unknown model", {"prompt": "x", "model": "no-such-model"}, 404, "model"),
    ("temperature NaN", b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("temperature 'nan'", {"prompt": "x", "temperature": "nan"}, 400, "temperature"),
    ("negative temperature", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("top_p zero", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("empty prompt", {"prompt": ""}, 400, "prompt"),
    ("empty token list", {"prompt": []}, 400, "prompt"),
    ("missing prompt", {"max_tokens": 4}, 400, "prompt"),
    ("prompt wrong type", {"prompt": 42}, 400, "prompt"),
    ("prompt too long", {"prompt": list(range(3, 3 + MAX_MODEL_LEN))}, 400, "prompt"),
    ("token id out of vocab", {"prompt": [5, 10**6]}, 400, "prompt"),
    ("batch of prompts", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("n of 0", {"prompt": "x", "n": 0}, 400, "n"),
    ("n too large", {"prompt": "x", "n": 99}, 400, "n"),
    ("echo", {"prompt": "x", "echo": True}, 400, "echo"),
    ("unknown field", {"prompt": "x", "max_tokenz": 4}, 400, "max_tokenz"),
    ("logprobs out of range", {"prompt": "x", "logprobs": 99}, 400, "logprobs"),
    ("negative stop token", {"prompt": "x", "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    # Values Python holds but their wire types do not (each once stopped the engine for everyone).
    ("top_k beyond int32", {"prompt": "hello", "max_tokens": 4, "top_k": 2147483648}, 400, "top_k"),
    ("temperature beyond float32", {"prompt": "x", "temperature": 1e39}, 400, "temperature"),
    ("top_p underflowing float32", {"prompt": "x", "top_p": 1e-46}, 400, "top_p"),
    ("seed beyond uint64", {"prompt": "x", "seed": 2**64}, 400, "seed"),
    ("max_tokens beyond uint32", {"prompt": "x", "max_tokens": 2**32}, 400, "max_tokens"),
    ("stop token beyond the vocabulary", {"prompt": "x", "stop_token_ids": [10**6]}, 400, "stop_token_ids"),
]


def test_bad_requests_are_rejected_and_server_keeps_serving(idle):
    for what, body, status, field in BAD_REQUESTS:
        for stream in (False, True):
            if isinstance(body, bytes):
                response = idle.client.post("/v1/completions", content=body,
                                            headers={"content-type": "application/json"})
            else:
                response = idle.client.post("/v1/completions", json={**body, "stream": stream})
            assert response.status_code == status, (what, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, what
            if field is None:
                assert "JSON" in error["message"], (what, error)
            else:
                assert error["param"] == field and field in error["message"], (what, error)
    assert idle.client.get("/health").status_code == 200
    stats = idle.engine.stats()
    assert stats.num_running == stats.num_waiting == 0 and stats.kv_usage == 0
    assert complete(idle, prompt=PROMPT, **GREEDY)["usage"]["completion_tokens"] == 8
    assert idle.client.get("/v1/nothing-here").json()["error"]["code"] == 404


def test_a_request_failing_in_a_step_fails_alone(idle, monkeypatch):
    """A request whose own sampler row fails gets an error (500, or an error event once its
    stream started) while a request beside it completes with the tokens it gets alone."""
    from quire.worker.sampler import Sampler

    alone = complete(idle, prompt=PROMPT, max_tokens=24, temperature=0, ignore_eos=True)["choices"][0]["text"]
    real = Sampler.process_logits

    def process_logits(self, logits, rows):
        if any(row.params.top_k == 4242 for row in rows):
            raise RuntimeError("injected failure")
        return real(self, logits, rows)

    monkeypatch.setattr(Sampler, "process_logits", process_logits)
    poisoned = {"prompt": "poison", "max_tokens": 24, "top_k": 4242}

    async def run():
        async with httpx.AsyncClient(base_url=idle.url, timeout=30) as client:
            good = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 24, "temperature": 0,
                                                        "ignore_eos": True})
            bad = client.post("/v1/completions", json=poisoned)
            bad_stream = client.post("/v1/completions", json={**poisoned, "stream": True})
            return await asyncio.gather(good, bad, bad_stream)

    good, bad, bad_stream = asyncio.run(run())
    assert good.status_code == 200 and good.json()["choices"][0]["text"] == alone
    assert bad.status_code == 500 and "injected failure" in bad.json()["error"]["message"]
    events = [json.loads(line[6:]) for line in bad_stream.text.splitlines() if line.startswith("data: {")]
    assert bad_stream.status_code in (200, 500) and "injected failure" in bad_stream.text, bad_stream.text
    assert bad_stream.status_code == 500 or "error" in events[-1]
    assert idle.client.get("/health").status_code == 200
    assert complete(idle, prompt=PROMPT, max_tokens=24, temperature=0, ignore_eos=True)["choices"][0]["text"] == alone


def _generated(server) -> int:
    return server.engine.engine.stats.generated_tokens


def test_stream_disconnect_aborts_request(idle):
    before = _generated(idle)
    body = {"prompt": PROMPT, "max_tokens": LONG, "temperature": 0, "ignore_eos": True, "stream": True}
    with idle.client.stream("POST", "/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break
        # (Abandoning httpx's line iterator already closes the unread connection, so the
        # server may be aborting by now; leaving the block closes it in any case.)
    # The server must abort the request, not run it to max_tokens.
    wait_for(lambda: idle.engine.stats().num_running == 0 and idle.engine.stats().kv_usage == 0, 10, "abort after disconnect")
    assert _generated(idle) - before < LONG


def test_non_stream_disconnect_aborts_request(idle):
    before = _generated(idle)
    with pytest.raises(httpx.ReadTimeout):
        idle.client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": LONG, "temperature": 0,
                                                  "ignore_eos": True}, timeout=0.5)
    wait_for(lambda: idle.engine.stats().num_running == 0 and idle.engine.stats().kv_usage == 0, 10, "abort after disconnect")
    assert _generated(idle) - before < LONG


# -- AsyncEngine on its own ----------------------------------------------------------------------

def test_async_engine_contracts(cache_dir):
    engine = AsyncEngine(make_engine())
    engine.start()

    async def run():
        with pytest.raises(ValueError, match="prompt"):
            async for _ in engine.generate("", SamplingParams(max_tokens=4)):
                raise AssertionError("no output for a rejected request")
        outputs = [o async for o in engine.generate(PROMPT, SamplingParams(**GREEDY))]
        assert [o.finished for o in outputs] == [False] * 7 + [True]
        assert [len(o.outputs[0].token_ids) for o in outputs] == [1] * 8  # deltas: each step's new token
        whole = OutputAccumulator()
        for output in outputs:
            whole.add(output)
        completion = whole.result().outputs[0]
        assert completion.text == engine.model.tokenizer.decode(completion.token_ids, skip_special_tokens=True)

        # An external abort ends the stream with finish_reason "abort".
        stream = engine.generate(PROMPT, SamplingParams(max_tokens=LONG, ignore_eos=True), request_id="r1")
        first = await stream.__anext__()
        engine.abort("r1")
        rest = [o async for o in stream]
        assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
        assert first.prompt_token_ids == rest[-1].prompt_token_ids

        # A consumer that stops early (cancelled task) aborts its request.
        got_one = asyncio.Event()

        async def consume_one():
            async for _ in engine.generate(PROMPT, SamplingParams(max_tokens=LONG, ignore_eos=True)):
                got_one.set()
                await asyncio.sleep(60)

        before = engine.engine.stats.generated_tokens
        task = asyncio.ensure_future(consume_one())
        await got_one.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return before

    try:
        before = asyncio.run(asyncio.wait_for(run(), 30))
        wait_for(lambda: engine.stats().num_running == 0 and engine.stats().kv_usage == 0, 10,
                 "abort of a cancelled consumer")
        assert engine.engine.stats.generated_tokens - before < LONG
        assert engine.healthy
    finally:
        engine.shutdown()
    assert not engine.healthy
    engine.shutdown()  # idempotent

    async def after_shutdown():
        async for _ in engine.generate(PROMPT, SamplingParams(max_tokens=2)):
            pass

    with pytest.raises(EngineDeadError):
        asyncio.run(after_shutdown())


def test_step_failure_fails_streams_and_health(cache_dir):
    inner = make_engine()
    deaths = []
    engine = AsyncEngine(inner, on_dead=deaths.append)
    app_client = None
    try:
        engine.start()
        real_step = inner.step
        calls = []

        def failing_step():
            calls.append(1)
            if len(calls) > 2:
                raise RuntimeError("worker exploded")
            return real_step()

        inner.step = failing_step

        async def run():
            async def drain(prompt):
                async for _ in engine.generate(prompt, SamplingParams(max_tokens=50, ignore_eos=True)):
                    pass

            # Both requests are in flight when the step fails: both streams must end with the error.
            results = await asyncio.gather(*(drain(f"{PROMPT} {i}") for i in range(2)), return_exceptions=True)
            assert all(isinstance(r, EngineDeadError) and "worker exploded" in str(r) for r in results), results
            with pytest.raises(EngineDeadError):  # new work is refused, not queued forever
                async for _ in engine.generate(PROMPT, SamplingParams(max_tokens=4)):
                    pass

        asyncio.run(asyncio.wait_for(run(), 30))
        assert not engine.healthy
        assert len(deaths) == 1 and "worker exploded" in str(deaths[0])  # `quire serve` exits on it
        from fastapi.testclient import TestClient

        app_client = TestClient(build_app(engine))
        health = app_client.get("/health")
        assert health.status_code == 503 and "worker exploded" in health.json()["reason"]
        response = app_client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
        assert response.status_code == 503 and "error" in response.json()
    finally:
        if app_client is not None:
            app_client.close()
        engine.shutdown()
