"""The serving contract: `AsyncEngine` implements every member of `EngineClient`; both
frontends run over a client that is no engine at all (as the data-parallel router will be),
so they use nothing but the contract; deltas fold into whole outputs in any interleaving."""
from __future__ import annotations

import asyncio
import inspect
import json

import grpc
import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from quire.cluster.core.outputs import CompletionOutput, OutputAccumulator, RequestOutput
from quire.cluster.serving.api_server import build_app
from quire.cluster.serving.async_engine import AsyncEngine
from quire.cluster.serving.engine_client import EngineClient, ServedModel, StatsSnapshot
from quire.cluster.serving.grpc_server import GrpcFrontend
from quire.protos import generate_pb2 as pb
from quire.protos import generate_pb2_grpc

PROMPT = [1, 2, 3]


def test_async_engine_implements_every_member_of_the_contract():
    members = [name for name in vars(EngineClient) if not name.startswith("_")]
    assert {"generate", "abort", "is_live", "model", "stats", "healthy", "failure"} <= set(members)
    for name in members:
        declared = inspect.getattr_static(EngineClient, name)
        if isinstance(declared, property):
            assert isinstance(inspect.getattr_static(AsyncEngine, name), property), name
            continue
        wanted = list(inspect.signature(declared).parameters.values())
        got = list(inspect.signature(getattr(AsyncEngine, name)).parameters.values())
        # The contract's parameters, in order and kind; anything more must be optional.
        assert [(p.name, p.kind) for p in got[:len(wanted)]] == [(p.name, p.kind) for p in wanted], name
        assert all(p.default is not inspect.Parameter.empty for p in got[len(wanted):]), name


def delta(*completions: CompletionOutput, finished: bool = False) -> RequestOutput:
    return RequestOutput("ignored", None, PROMPT, list(completions), finished)


# Two samples whose deltas arrive interleaved: sample 1 finishes first.
SCRIPT = [
    delta(CompletionOutput(0, "Hel", [11]), CompletionOutput(1, "Wor", [21])),
    delta(CompletionOutput(1, "ld", [22], finish_reason="length")),
    delta(CompletionOutput(0, "lo", [12], finish_reason="stop"), finished=True),
]


class ScriptedClient:
    """An EngineClient that is not an engine: every request replays SCRIPT."""

    model = ServedModel(name="scripted", tokenizer=None, max_model_len=64, vocab_size=100,
                        eos_token_ids=frozenset({0}), block_size=16, num_kv_blocks=8, tensor_parallel_size=1)
    healthy, failure = True, None

    def __init__(self):
        self.calls, self.aborted = [], []

    def stats(self) -> StatsSnapshot:
        replicas = (StatsSnapshot(1, 0, 0.25, None), StatsSnapshot(0, 2, 0.5, "replica 1 is draining"))
        return StatsSnapshot(1, 2, 0.375, None, replicas=replicas)

    def start(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    async def generate(self, prompt, params, request_id=None, *, cache_salt=None, priority=0):
        self.calls.append((prompt, params.n, request_id, cache_salt))
        for step in SCRIPT:
            await asyncio.sleep(0)
            yield RequestOutput(request_id, None, PROMPT, step.outputs, step.finished)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def is_live(self, request_id: str) -> bool:
        return False


def test_http_frontend_serves_any_engine_client():
    client = ScriptedClient()

    async def run():
        transport = httpx.ASGITransport(app=build_app(client))
        async with httpx.AsyncClient(transport=transport, base_url="http://scripted") as http:
            whole = (await http.post("/v1/completions", json={"prompt": PROMPT, "n": 2, "cache_salt": "t1"})).json()
            body = {"prompt": PROMPT, "n": 2, "stream": True, "stream_options": {"include_usage": True}}
            async with http.stream("POST", "/v1/completions", json=body) as response:
                events = [line[len("data: "):] async for line in response.aiter_lines() if line.startswith("data: ")]
            health = (await http.get("/health")).json()
        return whole, events, health

    whole, events, health = asyncio.run(run())
    assert [(c["index"], c["text"], c["finish_reason"]) for c in whole["choices"]] == [
        (0, "Hello", "stop"), (1, "World", "length")]  # ordered by index, whatever order they finished in
    assert whole["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert client.calls[0][1:2] == (2,) and client.calls[0][3] == "t1"  # `n` goes to the client, not fanned out
    chunks = [json.loads(event) for event in events[:-1]]
    assert events[-1] == "[DONE]"
    assert [(c["choices"][0]["index"], c["choices"][0]["text"]) for c in chunks[:-1]] == [
        (0, "Hel"), (1, "Wor"), (1, "ld"), (0, "lo")]
    assert chunks[-1]["usage"]["completion_tokens"] == 4
    assert health["status"] == "ok" and [r["healthy"] for r in health["replicas"]] == [True, False]


def test_grpc_frontend_serves_any_engine_client():
    client = ScriptedClient()

    async def run():
        frontend = GrpcFrontend(client, "127.0.0.1:0")
        await frontend.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{frontend.port}") as channel:
                stub = generate_pb2_grpc.GenerateStub(channel)
                request = pb.GenerateRequest(request_id="g1", token_ids=pb.TokenIds(ids=PROMPT),
                                             sampling=pb.SamplingOptions(n=2))
                messages = [message async for message in stub.Generate(request)]
                info = await stub.GetModelInfo(pb.GetModelInfoRequest())
                server = await stub.GetServerInfo(pb.GetServerInfoRequest())
        finally:
            await frontend.stop(0)
        return messages, info, server

    messages, info, server = asyncio.run(run())
    assert [(m.index, m.text, list(m.token_ids), m.finish_reason) for m in messages] == [
        (0, "Hel", [11], ""), (1, "Wor", [21], ""), (1, "ld", [22], "length"), (0, "lo", [12], "stop")]
    assert [m.usage.completion_tokens for m in messages if m.finish_reason] == [2, 2]
    assert (info.model, info.block_size, info.num_kv_blocks) == ("scripted", 16, 8)
    assert (server.num_running, server.num_waiting, server.healthy) == (1, 2, True)
    assert [(r.num_running, r.num_waiting, r.kv_cache_usage, r.healthy) for r in server.replicas] == [
        (1, 0, 0.25, True), (0, 2, 0.5, False)]


@settings(max_examples=200, derandomize=True, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 99), st.text(max_size=3)), min_size=1, max_size=6),
                min_size=1, max_size=4), st.randoms(use_true_random=False))
def test_deltas_fold_into_whole_outputs_in_any_interleaving(samples, rng):
    """Each sample's (token, text) pieces, delivered one delta at a time in a random order of
    samples (each sample's own in order), fold back into each sample whole, by index."""
    queue = [index for index, pieces in enumerate(samples) for _ in pieces]
    rng.shuffle(queue)
    position = [0] * len(samples)
    folded = OutputAccumulator()
    for step, index in enumerate(queue):
        token, text = samples[index][position[index]]
        position[index] += 1
        last = position[index] == len(samples[index])
        folded.add(delta(CompletionOutput(index, text, [token], "stop" if last else None, logprobs=[{token: -1.0}]),
                         finished=step == len(queue) - 1))
    result = folded.result()
    assert result.finished and [c.index for c in result.outputs] == list(range(len(samples)))
    for completion, pieces in zip(result.outputs, samples):
        assert completion.token_ids == [token for token, _ in pieces]
        assert completion.text == "".join(text for _, text in pieces)
        assert completion.logprobs == [{token: -1.0} for token, _ in pieces]
        assert completion.finish_reason == "stop"
