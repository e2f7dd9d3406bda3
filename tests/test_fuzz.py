"""Fuzzing both frontends with hypothesis: random, extreme and mutated bodies for
`POST /v1/completions` and `POST /v1/chat/completions`, random `quire.v1.GenerateRequest`
messages for gRPC, and damaged protobuf bytes for gRPC, all against one in-process server
(HTTP and gRPC on one event loop, one engine with a small context, so that even a huge
`max_tokens` ends quickly). What is sent is drawn by the strategies in fuzz_inputs.py.

Invariants checked after every example:
1. No server error for any request: HTTP answers 200 or a 4xx whose body is an error with a
   message; a 200 body finishes every choice; a 200 stream ends with `data: [DONE]` and any
   error event in it has a message. gRPC ends OK (every sample finished) or with
   INVALID_ARGUMENT, NOT_FOUND, OUT_OF_RANGE or RESOURCE_EXHAUSTED sent by the server; never
   INTERNAL, UNKNOWN, UNAVAILABLE or a passed deadline.
2. The engine stays alive: `AsyncEngine.healthy`, `GET /health` 200, gRPC health SERVING.
3. The engine drains: nothing running or waiting, no KV block in use, and
   `scheduler.check_integrity()` passes.

`QUIRE_FUZZ_EXAMPLES` sets the examples per test (default 300; a third of it for damaged
bytes). At the end of the module a line of statistics per frontend is printed (shown with
`pytest -s`) and, when `QUIRE_FUZZ_REPORT` names a file, written there as JSON.
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from types import SimpleNamespace

import grpc
import httpx
import pytest
import uvicorn
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from quire.cluster.serving.api_server import build_app
from quire.cluster.serving.async_engine import AsyncEngine
from quire.cluster.core.config import EngineConfig
from quire.cluster.core.engine import Engine
from quire.cluster.tools.default_model import default_model_dir
from quire.cluster.serving.grpc_server import GrpcFrontend
from quire.protos import generate_pb2 as pb
from quire.protos import generate_pb2_grpc

from fuzz_inputs import damaged_bytes, generate_requests, http_fields, http_payloads

EXAMPLES = int(os.environ.get("QUIRE_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    # No shrinking: one engine serves the whole module, so once an example kills it every later
    # example fails too, and shrinking would report a bystander instead of the culprit.
    phases=[Phase.explicit, Phase.generate])
GRPC_FINE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
             grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED}


# -- the server ----------------------------------------------------------------------------------
def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


class Server(SimpleNamespace):
    def __repr__(self) -> str:  # as a failing example shows it
        return "server"


def build_router(model: str):
    """Two in-process replicas behind the router: the same fuzz, through data parallelism."""
    from quire.cluster.core.block_hash import new_hash_seed
    from quire.cluster.serving.replica import InprocReplica, ReplicaHost
    from quire.cluster.serving.router import Router, served_model

    seed = new_hash_seed()
    kwargs = dict(model=model, num_kv_blocks=64, max_model_len=128, hash_seed=seed, kv_events=True)
    replicas = [InprocReplica(f"r{i}", ReplicaHost.build(Engine(EngineConfig.from_kwargs(**kwargs)))) for i in range(2)]
    return Router(replicas, served_model(kwargs, 64), seed, poll_seconds=0.05)


@pytest.fixture(scope="module", params=["engine", "router"])
def server(tokenizer_dir, request):
    stats = {name: dict(examples=0, statuses=Counter(), failures=0, engine_deaths=0, leaked_blocks=0)
             for name in ("/v1/completions", "/v1/chat/completions", "grpc", "grpc_bytes")}
    with pytest.MonkeyPatch.context() as mp:
        # conftest built the tiny random model in a temp cache; default_model_dir() returns it.
        mp.setenv("QUIRE_CACHE_DIR", str(tokenizer_dir.parent))
        mp.setenv("QUIRE_DEFAULT_MODEL", str(tokenizer_dir))  # the tiny random model, not the shipped one
        model = str(default_model_dir())
        if request.param == "router":
            engine = build_router(model)
        else:
            engine = AsyncEngine(Engine(EngineConfig.from_kwargs(model=model, num_kv_blocks=64, max_model_len=128)))
        frontends: list[GrpcFrontend] = []
        loops = []

        async def start_grpc():  # on uvicorn's event loop, as `quire serve` does
            import asyncio

            loops.append(asyncio.get_running_loop())
            frontends.append(GrpcFrontend(engine, "127.0.0.1:0"))
            await frontends[0].start()

        async def stop_grpc():
            for frontend in frontends:
                await frontend.stop(grace=1)

        app = build_app(engine, on_startup=start_grpc, on_shutdown=stop_grpc)
        uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=uv.run, name="fuzz-uvicorn", daemon=True)
        thread.start()
        try:
            assert wait_for(lambda: uv.started or not thread.is_alive(), 60) and uv.started and frontends
            port = uv.servers[0].sockets[0].getsockname()[1]
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http, \
                    grpc.insecure_channel(f"127.0.0.1:{frontends[0].port}") as channel:
                yield Server(http=http, channel=channel, stub=generate_pb2_grpc.GenerateStub(channel),
                             health=health_pb2_grpc.HealthStub(channel), engine=engine, stats=stats,
                             vocab=engine.model.vocab_size, culprit=None, backend=request.param, loop=loops[0])
        finally:
            uv.should_exit = True
            thread.join(15)
            engine.shutdown()
            for name, s in stats.items():
                print(f"\nfuzz {request.param} {name}: {s['examples']} examples, statuses {dict(sorted(s['statuses'].items()))}, "
                      f"{s['failures']} failures, {s['engine_deaths']} engine deaths, "
                      f"{s['leaked_blocks']} blocks leaked")
            if os.environ.get("QUIRE_FUZZ_REPORT"):
                with open(os.environ["QUIRE_FUZZ_REPORT"], "w") as out:
                    json.dump(stats, out, indent=1, sort_keys=True)


def fail(message: str):
    # The one place that raises: hypothesis then takes every failure for the same one (when it
    # replays a failing example at the end, a dead engine fails it in `require_alive` instead).
    raise AssertionError(message)


def require_alive(server) -> None:
    if not server.engine.healthy:
        fail(f"the engine died earlier, on: {server.culprit}")


def check_example(server, frontend: str, status: str, problem: str | None, what: str) -> None:
    """Record the example; fail unless every invariant holds (the module docstring's 1-3)."""
    stats, engine = server.stats[frontend], server.engine
    stats["examples"] += 1
    stats["statuses"][status] += 1
    problems = [problem] if problem else []

    def idle() -> bool:  # by the snapshots the engine loop publishes, with no command left for it
        stats = engine.stats()
        pending = engine._streams if server.backend == "router" else engine._commands
        return not stats.healthy or (stats.num_running == stats.num_waiting == 0 == stats.kv_usage and not pending)

    drained = wait_for(idle, 30)
    if not engine.healthy:
        stats["engine_deaths"] += 1
        problems.append(f"the engine died ({getattr(engine, '_error', None)!r})")
    elif server.backend == "router":
        problems += router_problems(server, stats, drained)
    else:
        time.sleep(0.005)  # let the loop go idle after its last publish,
        with engine._cond:  # and keep it from taking another command while we look
            pool, scheduler = engine.engine.kv.pool, engine.engine.scheduler
            leaked = pool.num_blocks - pool.num_free_blocks
            if leaked:
                stats["leaked_blocks"] += leaked
                problems.append(f"{leaked} KV blocks in use after the example")
            if not drained:
                problems.append(f"not drained: {len(scheduler.running)} running, {len(scheduler.waiting)} waiting")
            else:
                try:
                    scheduler.check_integrity()
                except AssertionError as exc:
                    problems.append(f"scheduler integrity: {exc}")
    if engine.healthy:
        try:
            health = server.http.get("/health")
        except httpx.TransportError:  # a connection the server closed after an error answer: once more
            health = server.http.get("/health")
        if health.status_code != 200:
            problems.append(f"GET /health answered {health.status_code}: {health.text[:300]}")
        serving = server.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        if serving != health_pb2.HealthCheckResponse.SERVING:
            problems.append(f"gRPC health is {health_pb2.HealthCheckResponse.ServingStatus.Name(serving)}")
    if problems:
        stats["failures"] += 1
        message = f"{what}\n  -> " + "\n  -> ".join(problems)
        if not engine.healthy:
            server.culprit = server.culprit or message
        fail(message)


def router_problems(server, stats: dict, drained: bool) -> list[str]:
    """Invariant 3 behind the router: every replica drained, its blocks free, its cache intact."""
    import asyncio

    router, problems = server.engine, []
    if not drained:
        problems.append(f"not drained: {len(router._streams)} streams open")

    def inspect(replica_id):
        return asyncio.run_coroutine_threadsafe(router.handle(replica_id).inspect(), server.loop).result(30)

    for replica_id in router.replica_ids():
        try:
            # An abort reaches a replica a moment after its stream closed: give it that moment.
            wait_for(lambda: (lambda i: i.num_free_blocks == i.num_blocks and not i.num_unfinished)(
                inspect(replica_id)), 5)
            inspection = inspect(replica_id)
        except AssertionError as exc:
            problems.append(f"replica {replica_id} integrity: {exc}")
            continue
        leaked = inspection.num_blocks - inspection.num_free_blocks
        if leaked:
            stats["leaked_blocks"] += leaked
            problems.append(f"{leaked} KV blocks in use on replica {replica_id} after the example")
        if drained and inspection.num_unfinished:
            problems.append(f"replica {replica_id} still has {inspection.num_unfinished} requests")
    if len(router.replica_ids()) != 2:
        problems.append(f"a replica was lost: serving {router.replica_ids()}")
    return problems


# -- the tests -------------------------------------------------------------------------------------
def http_problem(status: int, content_type: str, text: str) -> str | None:
    """What breaks invariant 1 in an HTTP answer, or None."""
    if not (status == 200 or 400 <= status < 500):
        return f"HTTP {status}: {text[:500]}"
    try:
        if status != 200:
            message = json.loads(text)["error"]["message"]
            return None if isinstance(message, str) and message else f"HTTP {status} without a message: {text[:500]}"
        if not content_type.startswith("text/event-stream"):
            choices = json.loads(text)["choices"]
            return None if choices and all(c["finish_reason"] for c in choices) else f"unfinished: {text[:500]}"
        events = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return f"the stream does not end with [DONE]: {text[-500:]}"
        errors = [json.loads(event).get("error") for event in events[:-1]]
        if any(error is not None and not error["message"] for error in errors):
            return f"an error event without a message: {text[-500:]}"
    except (ValueError, KeyError, TypeError) as exc:
        return f"HTTP {status}: unexpected body ({exc!r}): {text[:500]}"
    return None


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@FUZZ
@given(data=st.data())
def test_fuzz_http(server, path, data):
    completion, chat, extremes = http_fields(server.vocab)
    fields, required = (chat, ("messages", "max_tokens")) if "chat" in path else (completion, ("prompt", "max_tokens"))
    payload = data.draw(http_payloads(fields, extremes, required))
    require_alive(server)
    try:
        with server.http.stream("POST", path, content=payload, headers={"content-type": "application/json"}) as r:
            text = r.read().decode("utf-8", "replace")
        status, problem = str(r.status_code), http_problem(r.status_code, r.headers.get("content-type", ""), text)
    except httpx.TransportError as exc:
        status, problem = "no answer", f"no HTTP answer: {exc!r}"
    check_example(server, path, status, problem, f"POST {path} {payload[:2000]!r}")


def fuzz_grpc(server, frontend: str, call, request, n: int | None, what: str) -> None:
    """Run one Generate call to its end; `n`: the samples it asks for (None: an invalid message)."""
    require_alive(server)
    finished, problem = set(), None
    try:
        for message in call(request, timeout=30):
            if message.finish_reason:
                finished.add(message.index)
        code = grpc.StatusCode.OK
        if n is None or finished != set(range(n)):
            problem = f"OK, but finished samples {sorted(finished)} of n={n}"
    except grpc.RpcError as exc:
        code = exc.code()
        if code not in GRPC_FINE:
            problem = f"gRPC {code.name}: {exc.details()}"
        elif exc.details().startswith("Stream removed"):  # the client's own words: the server's status was lost
            problem = f"gRPC {code.name} from the transport: {exc.details()}"
    check_example(server, frontend, code.name, problem, what)


@FUZZ
@given(data=st.data())
def test_fuzz_grpc_generate(server, data):
    request = data.draw(generate_requests(server.vocab))
    n = request.sampling.n if request.sampling.HasField("n") else 1
    fuzz_grpc(server, "grpc", server.stub.Generate, request, n, f"Generate({str(request)[:2000]!r})")


@settings(FUZZ, max_examples=max(EXAMPLES // 3, 1))
@given(data=st.data())
def test_fuzz_grpc_damaged_bytes(server, data):
    payload = data.draw(damaged_bytes(server.vocab))
    call = server.channel.unary_stream("/quire.v1.Generate/Generate", request_serializer=bytes,
                                       response_deserializer=pb.GenerateResponse.FromString)
    try:
        sampling = pb.GenerateRequest.FromString(payload).sampling
        n = sampling.n if sampling.HasField("n") else 1
    except DecodeError:
        n = None  # not a message: the server must refuse it
    fuzz_grpc(server, "grpc_bytes", call, payload, n, f"Generate(bytes {payload[:2000]!r})")
