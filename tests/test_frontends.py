"""Both frontends of a real `quire serve` on loopback: the official `openai` client over HTTP,
generated stubs and a stub-less reflection client over gRPC, bad input on both, and 200
concurrent streams with cancellations that leave no KV block behind."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import time

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from quire.protos import generate_pb2 as pb
from quire.protos import generate_pb2_grpc
from serve_process import ServeProcess

MAX_MODEL_LEN = 256
MAX_REQUEST_BYTES = 1 << 20
GREEDY = pb.SamplingOptions(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def server(tokenizer_dir):
    env = {**os.environ, "QUIRE_CACHE_DIR": str(tokenizer_dir.parent), "QUIRE_DEFAULT_MODEL": str(tokenizer_dir)}
    # Asynchronous scheduling (off by default in process): these tests then cover it under
    # concurrent streams, cancellations and deadlines; tests/test_api_server.py covers the default.
    args = ["--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "512", "--max-num-seqs", "256",
            "--max-request-bytes", str(MAX_REQUEST_BYTES), "--log-level", "warning", "--async-scheduling"]
    with ServeProcess(args, env) as process:
        yield process
    assert "Traceback" not in process.output(), process.output()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield generate_pb2_grpc.GenerateStub(channel)


def server_info(stub) -> pb.GetServerInfoResponse:
    return stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)


def wait_until_idle(stub, timeout: float = 30.0) -> pb.GetServerInfoResponse:
    deadline = time.monotonic() + timeout
    while True:
        info = server_info(stub)
        if (info.num_running, info.num_waiting, info.kv_cache_usage) == (0, 0, 0.0) or time.monotonic() > deadline:
            return info
        time.sleep(0.05)


# -- the official openai client, unchanged -------------------------------------------------------
def test_openai_completions_plain_and_streaming(client, server):
    model = client.models.list().data[0].id
    assert model == server.model
    done = client.completions.create(model=model, prompt="Hello world", max_tokens=6, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 6
    chunks = list(client.completions.create(model=model, prompt="Hello world", max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-2].choices[0].finish_reason == "length"


def test_openai_chat_plain_streaming_n_and_logprobs(client, server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    done = client.chat.completions.create(model=server.model, messages=messages, max_completion_tokens=5,
                                          temperature=0, extra_body={"ignore_eos": True})
    assert done.object == "chat.completion" and done.choices[0].message.role == "assistant"
    assert done.usage.completion_tokens == 5 and done.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(model=server.model, messages=messages, max_tokens=5, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == done.choices[0].message.content
    # n samples: greedy ones agree; seeded sampled ones are reproducible and differ from each other
    greedy = client.chat.completions.create(model=server.model, messages=messages, max_tokens=5, temperature=0,
                                            n=3, extra_body={"ignore_eos": True})
    assert {c.message.content for c in greedy.choices} == {done.choices[0].message.content}
    assert greedy.usage.completion_tokens == 15
    sampled = [client.chat.completions.create(model=server.model, messages=messages, max_tokens=8, temperature=1.0,
                                              seed=7, n=2, logprobs=True, top_logprobs=3,
                                              extra_body={"ignore_eos": True}) for _ in range(2)]
    texts = [[c.message.content for c in s.choices] for s in sampled]
    assert texts[0] == texts[1] and texts[0][0] != texts[0][1]
    first = sampled[0].choices[0].logprobs.content[0]
    assert len(first.top_logprobs) == 3 and first.logprob <= 0
    assert [t.logprob for t in first.top_logprobs] == sorted((t.logprob for t in first.top_logprobs), reverse=True)


def test_chat_template_is_applied(server, tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = [{"role": "user", "content": "Hi there"}]
    expected = len(tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                  tokenize=False), add_special_tokens=False))
    body = httpx.post(f"{server.http_url}/v1/chat/completions", timeout=30,
                      json={"messages": messages, "max_tokens": 1}).json()
    assert body["usage"]["prompt_tokens"] == expected


# -- gRPC ------------------------------------------------------------------------------------------
def test_grpc_streaming_generate_matches_http(stub, client, server):
    messages = list(stub.Generate(pb.GenerateRequest(text="Hello world", sampling=GREEDY), timeout=30))
    assert all(m.request_id == messages[0].request_id for m in messages)
    assert sum(len(m.token_ids) for m in messages) == 6 and messages[-1].finish_reason == "length"
    assert messages[-1].usage.completion_tokens == 6 and not messages[0].finish_reason
    http = client.completions.create(model=server.model, prompt="Hello world", max_tokens=6, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert "".join(m.text for m in messages) == http.choices[0].text


def test_grpc_logprobs_tokenize_and_info(stub, server):
    options = pb.SamplingOptions(max_tokens=3, temperature=0, ignore_eos=True, logprobs=2)
    messages = list(stub.Generate(pb.GenerateRequest(text="Hello", sampling=options), timeout=30))
    logprobs = [lp for m in messages for lp in m.logprobs]
    assert len(logprobs) == 3 and all(len(lp.top) == 2 for lp in logprobs)
    assert all(lp.token.token_id == lp.top[0].token_id for lp in logprobs), "greedy picks the most likely token"
    tokens = stub.Tokenize(pb.TokenizeRequest(text="Hello world"), timeout=10)
    by_ids = list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=tokens.token_ids), sampling=GREEDY)))
    assert by_ids[-1].usage.prompt_tokens == len(tokens.token_ids)
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.model == server.model and info.max_model_len == MAX_MODEL_LEN and info.num_kv_blocks == 512


def test_grpc_n_samples_interleave_and_match_http(stub, client, server):
    """n seeded samples on one stream, each message naming its sample: the same texts as the
    HTTP frontend's n for the same seed, each sample finishing on its own last message."""
    options = pb.SamplingOptions(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True, n=3, logprobs=1)
    messages = list(stub.Generate(pb.GenerateRequest(text="Hi there", sampling=options), timeout=30))
    by_index = {i: [m for m in messages if m.index == i] for i in range(3)}
    assert sorted({m.index for m in messages}) == [0, 1, 2]
    for sample in by_index.values():
        assert sum(len(m.token_ids) for m in sample) == 8 and len([lp for m in sample for lp in m.logprobs]) == 8
        assert sample[-1].finish_reason == "length" and sample[-1].usage.completion_tokens == 8
        assert not any(m.finish_reason for m in sample[:-1])
    texts = ["".join(m.text for m in by_index[i]) for i in range(3)]
    http = client.completions.create(model=server.model, prompt="Hi there", max_tokens=8, temperature=1.0, seed=7,
                                     n=3, extra_body={"ignore_eos": True})
    assert texts == [c.text for c in sorted(http.choices, key=lambda c: c.index)] and len(set(texts)) > 1
    long = pb.SamplingOptions(max_tokens=MAX_MODEL_LEN - 8, temperature=0, ignore_eos=True, n=2)
    call = stub.Generate(pb.GenerateRequest(request_id="two-samples", text="Hi", sampling=long), timeout=60)
    next(call)
    assert stub.Abort(pb.AbortRequest(request_id="two-samples"), timeout=10).aborted
    finished = [m for m in call if m.finish_reason]
    assert sorted(m.index for m in finished) == [0, 1] and {m.finish_reason for m in finished} == {"abort"}
    info = wait_until_idle(stub)
    assert (info.num_running, info.num_waiting, info.kv_cache_usage) == (0, 0, 0.0)


def test_grpc_abort_and_deadline_free_the_request(stub):
    long = pb.SamplingOptions(max_tokens=MAX_MODEL_LEN - 8, temperature=0, ignore_eos=True)
    call = stub.Generate(pb.GenerateRequest(request_id="to-abort", text="Hi", sampling=long), timeout=60)
    first = next(call)
    assert first.request_id == "to-abort"
    assert stub.Abort(pb.AbortRequest(request_id="to-abort"), timeout=10).aborted
    rest = list(call)
    assert rest[-1].finish_reason == "abort"
    assert not stub.Abort(pb.AbortRequest(request_id="to-abort"), timeout=10).aborted
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(pb.GenerateRequest(text="Hi", sampling=long), timeout=0.5))
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    cancelled = stub.Generate(pb.GenerateRequest(text="Hi", sampling=long), timeout=60)
    next(cancelled)
    cancelled.cancel()
    info = wait_until_idle(stub)
    assert (info.num_running, info.num_waiting, info.kv_cache_usage) == (0, 0, 0.0)


def test_reflection_lists_services_and_health_answers(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                    timeout=10))
        names = {s.name for s in answers[0].list_services_response.service}
        assert {"quire.v1.Generate", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "quire.v1.Generate"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING


# -- bad input, each refused naming the field, the server serving on -------------------------------
HTTP_BAD = [
    # (path, body (JSON-able, or raw bytes), status, field named in the message and `param`)
    ("/v1/completions", b'{"prompt": "x", "max_tokens": ', 400, None),
    ("/v1/completions", {"prompt": "x", "max_tokens": "eight"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-nope"}, 404, "model"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("/v1/completions", {"prompt": list(range(3, 3 + MAX_MODEL_LEN))}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
     400, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 2**31}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
     400, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     400, "tools"),
]


def test_http_bad_input_names_the_field(server, client):
    with httpx.Client(base_url=server.http_url, timeout=30) as http:
        for path, body, status, field in HTTP_BAD:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            response = http.post(path, content=content, headers={"content-type": "application/json"})
            assert response.status_code == status, (body, response.text)
            error = response.json()["error"]
            if field is None:
                assert "JSON" in error["message"]
            else:
                assert error["param"] == field and field in error["message"], (body, error)
        oversize = http.post("/v1/completions", content=b"x" * (MAX_REQUEST_BYTES + 1),
                             headers={"content-type": "application/json"})
        assert oversize.status_code == 413
    assert client.completions.create(model=server.model, prompt="still", max_tokens=2).usage.completion_tokens


GRPC_BAD = [
    (pb.GenerateRequest(sampling=GREEDY), "prompt"),
    (pb.GenerateRequest(text="x", sampling=pb.SamplingOptions(max_tokens=0)), "max_tokens"),
    (pb.GenerateRequest(text="x", sampling=pb.SamplingOptions(temperature=float("nan"))), "temperature"),
    (pb.GenerateRequest(text="x", sampling=pb.SamplingOptions(top_p=0)), "top_p"),
    (pb.GenerateRequest(text=""), "prompt"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * (MAX_MODEL_LEN + 1))), "prompt"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[10**7])), "prompt"),
    (pb.GenerateRequest(text="x", sampling=pb.SamplingOptions(n=0)), "n"),
    (pb.GenerateRequest(text="x", sampling=pb.SamplingOptions(n=65)), "n"),
]


def test_grpc_bad_input_names_the_field(stub, server):
    for request, field in GRPC_BAD:
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(request, timeout=10))
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (request, caught.value.details())
        assert f"`{field}`" in caught.value.details(), (field, caught.value.details())
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(pb.GenerateRequest(text="x", model="gpt-nope"), timeout=10))
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND and "`model`" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(pb.GenerateRequest(text="x" * (MAX_REQUEST_BYTES + 1)), timeout=10))
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    host, port = server.grpc_target.rsplit(":", 1)
    for garbage in (b"\x00" * 64, os.urandom(4096), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"):
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            raw.sendall(garbage)
    assert sum(len(m.token_ids) for m in stub.Generate(pb.GenerateRequest(text="still", sampling=GREEDY))) == 6


# -- load: 200 concurrent streams over both frontends, some cancelled halfway -----------------------
def test_200_concurrent_streams_with_cancellations_leak_nothing(server, stub):
    async def over_http(http: httpx.AsyncClient, index: int, cancel: bool):
        body = {"prompt": f"Request {index}", "max_tokens": 12, "temperature": 0.7, "seed": index,
                "ignore_eos": True, "stream": True}
        text, done = "", False
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200, await response.aread()
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text += chunk["choices"][0]["text"]
                if cancel and text:
                    return "cancelled"
        assert done
        return "done"

    async def over_grpc(channel, index: int, cancel: bool):
        request = pb.GenerateRequest(text=f"Request {index}", sampling=pb.SamplingOptions(
            max_tokens=12, temperature=0.7, seed=index, ignore_eos=True))
        call = generate_pb2_grpc.GenerateStub(channel).Generate(request, timeout=120)
        tokens = 0
        async for message in call:
            tokens += len(message.token_ids)
            if cancel and tokens >= 3:
                call.cancel()
                return "cancelled"
        assert tokens == 12
        return "done"

    async def run():
        async with httpx.AsyncClient(base_url=server.http_url, timeout=120,
                                     limits=httpx.Limits(max_connections=200)) as http, \
                grpc.aio.insecure_channel(server.grpc_target) as channel:
            # Odd requests over HTTP, even over gRPC; one in two on each side is cancelled.
            jobs = [over_http(http, i, i % 4 == 1) if i % 2 else over_grpc(channel, i, i % 4 == 0)
                    for i in range(200)]
            return await asyncio.gather(*jobs)

    outcomes = asyncio.run(run())
    assert outcomes == ["cancelled" if i % 4 in (0, 1) else "done" for i in range(200)]
    info = wait_until_idle(stub)
    assert (info.num_running, info.num_waiting, info.kv_cache_usage) == (0, 0, 0.0), info
    metrics = httpx.get(f"{server.http_url}/metrics", timeout=10).text
    assert 'quire_requests_total{finish_reason="abort"' in metrics
    assert "quire_kv_cache_usage_ratio" in metrics and "quire_time_to_first_token_seconds_bucket" in metrics


def test_cache_salt_on_both_frontends(server, stub):
    def hits() -> float:
        text = httpx.get(f"{server.http_url}/metrics", timeout=10).text
        line = next(x for x in text.splitlines() if x.startswith("quire_prefix_cache_hits_total"))
        return float(line.rsplit(" ", 1)[1])

    prompt = "A long shared system prompt, the same for every tenant, " * 3
    body = {"prompt": prompt, "max_tokens": 1, "cache_salt": "tenant-a"}
    assert httpx.post(f"{server.http_url}/v1/completions", json=body, timeout=30).status_code == 200
    wait_until_idle(stub)
    before = hits()
    list(stub.Generate(pb.GenerateRequest(text=prompt, cache_salt="tenant-b", sampling=GREEDY), timeout=30))
    wait_until_idle(stub)
    assert hits() == before, "another tenant's salt must not hit tenant a's blocks"
    list(stub.Generate(pb.GenerateRequest(text=prompt, cache_salt="tenant-a", sampling=GREEDY), timeout=30))
    wait_until_idle(stub)
    assert hits() >= before + 16, "the same salt shares the prompt's full blocks across frontends"
    bad = httpx.post(f"{server.http_url}/v1/completions", json={**body, "cache_salt": ""}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache_salt"
