"""Fuzzing both frontends with hypothesis: random, extreme and mutated bodies for
`POST /v1/completions` and `POST /v1/chat/completions`, random `quire.v1.GenerateRequest`
messages for gRPC, and damaged protobuf bytes for gRPC, all against one in-process server
(HTTP and gRPC on one event loop, one engine with a small context, so that even a huge
`max_tokens` ends quickly).

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

EXAMPLES = int(os.environ.get("QUIRE_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    # No shrinking: one engine serves the whole module, so once an example kills it every later
    # example fails too, and shrinking would report a bystander instead of the culprit.
    phases=[Phase.explicit, Phase.generate])
GRPC_FINE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
             grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED}


def chance(one_in: int):
    """True about once in `one_in` draws (hypothesis favours the ends of a range, so not those)."""
    return st.integers(0, 2 * one_in - 1).map(lambda roll: roll in (one_in // 2, one_in + one_in // 2))


def rarely(strategy, otherwise, one_in: int = 6):
    """`strategy` about once in `one_in` draws, else `otherwise` (a strategy or a value)."""
    usual = otherwise if isinstance(otherwise, st.SearchStrategy) else st.just(otherwise)
    return chance(one_in).flatmap(lambda hit: strategy if hit else usual)


def unit(low: float, high: float):
    return st.floats(low, high, allow_nan=False)


# -- values --------------------------------------------------------------------------------------
INTS = [0, 1, -1, 2**31 - 1, 2**31, -2**31, -2**31 - 1, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63,
        -2**63, -2**63 - 1, 2**64 - 1, 2**64, 10**100, -10**100]
FLOATS = [-0.0, 5e-324, 2.2250738585072014e-308, 1e-46, 1e-45, 1e-39, 1.1754943e-38, 1e-30, 0.5, 0.9999999,
          1.0000001, 2.0000001, 3.4e38, 3.4028235e38, 3.5e38, 1e39, -1e39, 1.7976931348623157e308,
          -1.7976931348623157e308, float("nan"), float("inf"), float("-inf")]
ODD_CHARS = ["\x00", "\ud800", "\udfff", "\ufffe", "\U0010ffff", "😀", "\u202e", "\ufeff", "\r", "é"]
STRINGS = ["", " ", "\x00", "a\x00b", "\ud800", "\udfff\ud800x", "😀" * 40, "NaN", "Infinity", "-Infinity", "1e39",
           "null", "\u202e\ufeff\u200b", "<|end_of_text|>", "<|begin_of_text|><|pad|>", "<|user|>\n", "a" * 100_000]


def odd_text(chars: list[str], strings: list[str]):
    # (st.text would about never draw these few characters from a whole-Unicode alphabet)
    return st.sampled_from(strings) | st.lists(st.sampled_from(chars) | st.characters(), min_size=1,
                                               max_size=8).map("".join)


ODD_TEXT = odd_text(ODD_CHARS, STRINGS)
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12), st.sampled_from(INTS),
              st.sampled_from(FLOATS), ODD_TEXT),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)
BIG_INT = rarely(st.integers(), st.sampled_from(INTS), 4)
BIG_FLOAT = rarely(st.floats() | st.sampled_from(["NaN", "Infinity", "-inf", "1e39", "1e-46", "-0", "0x1p-149"]),
                   st.sampled_from(FLOATS + INTS[:8]), 4)


# -- HTTP bodies -------------------------------------------------------------------------------
def http_fields(vocab: int) -> tuple[dict, dict, dict]:
    """(completion fields, chat fields, extremes): each name → a strategy of plausible values,
    and (for the typed fields) name → a strategy of extreme ones."""
    ids = st.lists(st.integers(3, vocab - 1), min_size=1, max_size=8)
    odd_ids = st.lists(BIG_INT | st.integers(vocab - 2, vocab + 2), min_size=1, max_size=8)
    common = {
        "model": st.just("tiny-random-llama-v1") | st.none(),
        "temperature": st.sampled_from([0, 0.0, 1]) | unit(0, 2), "top_p": unit(0.01, 1),
        "top_k": st.integers(-1, 50), "min_p": unit(0, 1), "seed": st.integers(0, 2**64 - 1) | st.just(2**64 - 1),
        "stop": st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=3),
        "stop_token_ids": st.lists(st.integers(0, vocab - 1), max_size=3),
        "presence_penalty": unit(-2, 2), "frequency_penalty": unit(-2, 2), "repetition_penalty": unit(0.1, 2),
        "n": st.integers(1, 16), "stream": st.booleans(), "stream_options": st.just({"include_usage": True}),
        "ignore_eos": st.booleans(), "include_stop_str_in_output": st.booleans(),
        "skip_special_tokens": st.booleans(), "cache_salt": st.text(min_size=1, max_size=8),
        "user": st.text(max_size=8), "logit_bias": st.just({}),
    }
    completion = {
        **common, "max_tokens": st.integers(1, 4), "logprobs": st.integers(0, 5), "echo": st.just(False),
        "best_of": st.just(1), "suffix": st.just(""),
        "prompt": st.sampled_from(["hi", "Hello world"]) | st.text(min_size=1, max_size=20) | ids
        | st.lists(ids, min_size=1, max_size=1) | st.lists(st.just("hi"), min_size=1, max_size=1),
    }
    roles = st.sampled_from(["system", "developer", "user", "assistant", "tool"])

    def messages(role, text):
        content = text | st.none() | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}),
                                              max_size=2)
        return st.lists(st.fixed_dictionaries({"role": role, "content": content}, optional={"name": text}),
                        min_size=1, max_size=3)

    chat = {
        **common, "max_tokens": st.integers(1, 4), "max_completion_tokens": st.integers(1, 4),
        "messages": messages(roles, st.text(max_size=20)), "logprobs": st.booleans(),
        "top_logprobs": st.integers(0, 5), "add_generation_prompt": st.booleans(), "tools": st.just([]),
        "tool_choice": st.sampled_from(["none", "auto"]), "parallel_tool_calls": st.booleans(),
        "response_format": st.just({"type": "text"}), "store": st.booleans(),
        "metadata": st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
    }
    ints = ("max_tokens", "max_completion_tokens", "top_k", "seed", "n", "logprobs", "top_logprobs", "best_of")
    floats = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
    extremes = {
        **dict.fromkeys(ints, BIG_INT), **dict.fromkeys(floats, BIG_FLOAT), "stop_token_ids": odd_ids,
        **dict.fromkeys(("model", "stop", "cache_salt", "user", "suffix"),
                        ODD_TEXT | st.lists(ODD_TEXT, min_size=1, max_size=3)),
        "prompt": ODD_TEXT | odd_ids | st.lists(ODD_TEXT, min_size=1, max_size=2) | st.lists(odd_ids, max_size=2)
        | st.lists(st.integers(3, vocab - 1), min_size=120, max_size=5000),
        "messages": messages(roles | ODD_TEXT, ODD_TEXT)
        | st.lists(st.just({"role": "user", "content": "hi"}), min_size=100, max_size=300),
    }
    return completion, chat, extremes


@st.composite
def http_payloads(draw, fields: dict, extremes: dict, required: tuple[str, ...]) -> bytes:
    """A body: (a) valid, mostly with one or two typed fields made extreme, (b) random JSON, or
    (c) a valid body mutated (fields dropped, replaced, wrapped, nested; unknown keys added).
    Sent as Python's json writes it (so NaN and Infinity come as bare tokens); now and then
    cut short or with bytes that are not UTF-8."""
    names = sorted(fields)
    body = {name: draw(fields[name]) for name in required}
    body.update({name: draw(fields[name]) for name in draw(st.lists(st.sampled_from(names), max_size=4, unique=True))})
    if draw(chance(3)):  # parallel samples (which fork the first one's blocks) are a dimension of their own
        body["n"] = draw(st.integers(2, 16))
    if "best_of" in body:  # only valid as these
        body["best_of"] = body.get("n", 1)
    if "stream_options" in body:
        body["stream"] = True
    kind = draw(st.sampled_from(["valid", "extreme", "extreme", "extreme", "extreme", "extreme", "random", "mutated"]))
    if kind == "extreme":  # mostly one field, so that it is what the server sees first
        count = 2 if draw(chance(4)) else 1
        for name in draw(st.lists(st.sampled_from(sorted(set(extremes) & set(fields))), min_size=count,
                                  max_size=count, unique=True)):
            body[name] = draw(extremes[name])
    elif kind == "random":
        body = draw(JSON_VALUES | st.dictionaries(st.sampled_from(names), JSON_VALUES, max_size=6))
    elif kind == "mutated":
        for _ in range(draw(st.integers(1, 3))):
            how, name = draw(st.sampled_from(["drop", "replace", "wrap", "nest", "add"])), draw(st.sampled_from(names))
            if how == "drop":
                body.pop(name, None)
            elif how == "replace":
                body[name] = draw(JSON_VALUES)
            elif how == "wrap":
                body[name] = [body.get(name)] * draw(st.integers(1, 3))
            elif how == "nest":
                body[name] = {"value": body.get(name), draw(st.text(max_size=5)): draw(JSON_VALUES)}
            else:
                body[draw(ODD_TEXT | st.sampled_from(["max_tokenz", "", "prompt ", "Prompt"]))] = draw(JSON_VALUES)
    payload = json.dumps(body, allow_nan=True).encode()
    if draw(chance(25)):
        payload = draw(st.sampled_from([payload[:len(payload) // 2], payload + b"\xff", b"\xc3(" + payload]))
    return payload


# -- gRPC requests -----------------------------------------------------------------------------
def edges(low: int, high: int):
    near = [low, low + 1, -1, 0, 1, 2, high // 2, high // 2 + 1, high - 1, high]
    return rarely(st.integers(low, high), st.sampled_from([v for v in near if low <= v <= high]), 4)


UINT32, INT32, UINT64 = edges(0, 2**32 - 1), edges(-2**31, 2**31 - 1), edges(0, 2**64 - 1)
ANY_FLOAT = rarely(st.floats(), st.sampled_from(FLOATS + [0.0, 1.0, 2.0, -2.0, -1.0]), 4)
# A protobuf string must be valid UTF-8 (the client refuses to send others; damaged bytes do).
TEXT = st.text(max_size=20) | odd_text([c for c in ODD_CHARS if not "\ud800" <= c <= "\udfff"],
                                       [s for s in STRINGS if "\ud800" not in s and "\udfff" not in s])


def sampling_options(vocab: int):
    extreme = dict(max_tokens=UINT32, temperature=ANY_FLOAT, top_p=ANY_FLOAT, top_k=INT32, min_p=ANY_FLOAT,
                   seed=UINT64, logprobs=UINT32, presence_penalty=ANY_FLOAT, frequency_penalty=ANY_FLOAT,
                   repetition_penalty=ANY_FLOAT, n=UINT32, stop=st.lists(TEXT, max_size=3),
                   stop_token_ids=st.lists(INT32 | st.integers(0, vocab + 2), max_size=3))
    plausible = dict(max_tokens=st.integers(1, 4), temperature=unit(0, 2), top_p=unit(0.01, 1),
                     top_k=st.integers(-1, 50), min_p=unit(0, 1), seed=st.integers(0, 1000) | st.just(2**64 - 1),
                     logprobs=st.integers(0, 5), presence_penalty=unit(-2, 2), frequency_penalty=unit(-2, 2),
                     repetition_penalty=unit(0.1, 2), skip_special_tokens=st.booleans(), n=st.integers(1, 16),
                     ignore_eos=st.booleans(), stop=st.lists(st.text(min_size=1, max_size=3), max_size=2),
                     stop_token_ids=st.lists(st.integers(0, vocab - 1), max_size=2))

    @st.composite
    def options(draw) -> pb.SamplingOptions:
        chosen = draw(st.lists(st.sampled_from(sorted(plausible)), max_size=5, unique=True))
        values = {name: draw(plausible[name]) for name in chosen}
        if draw(chance(3)):
            values["n"] = draw(st.integers(2, 16))
        if not draw(chance(5)):  # mostly one field extreme, sometimes two
            count = 2 if draw(chance(4)) else 1
            for name in draw(st.lists(st.sampled_from(sorted(extreme)), min_size=count, max_size=count, unique=True)):
                values[name] = draw(extreme[name])
        if "max_tokens" not in values and not draw(chance(5)):  # keep most generations short
            values["max_tokens"] = draw(st.integers(1, 4))
        return pb.SamplingOptions(**values)

    return options()


@st.composite
def generate_requests(draw, vocab: int) -> pb.GenerateRequest:
    request = pb.GenerateRequest(sampling=draw(sampling_options(vocab)), request_id=draw(rarely(TEXT, "")),
                                 model=draw(rarely(TEXT, st.sampled_from(["", "tiny-random-llama-v1"]), 10)),
                                 cache_salt=draw(rarely(TEXT, "")))
    prompt = draw(rarely(st.sampled_from(["odd_ids", "odd_ids", "none"]), st.sampled_from(["text", "ids"]), 5))
    if prompt == "text":
        request.text = draw(st.sampled_from(["hi", "Hello world"]) | TEXT)
    elif prompt == "ids":
        request.token_ids.ids.extend(draw(st.lists(st.integers(3, vocab - 1), max_size=8)))
    elif prompt == "odd_ids":  # out of the vocabulary, or longer than the context
        request.token_ids.ids.extend(draw(st.lists(INT32 | st.sampled_from([vocab - 1, vocab, vocab + 1]), max_size=8)
                                          | st.lists(st.integers(3, vocab - 1), min_size=120, max_size=3000)))
    return request


@st.composite
def damaged_bytes(draw, vocab: int) -> bytes:
    """A serialized GenerateRequest, damaged: cut, a byte changed, junk appended, or a string
    (request_id, text, model, cache_salt, or a stop string in `sampling`) that is not UTF-8."""
    payload = draw(generate_requests(vocab)).SerializeToString()
    how, at = draw(st.sampled_from(["cut", "byte", "append", "utf8"])), draw(st.integers(0, max(len(payload) - 1, 0)))
    if how == "cut":
        return payload[:at]
    if how == "byte":
        return payload[:at] + bytes([draw(st.integers(0, 255))]) + payload[at + 1:]
    if how == "append":
        return payload + draw(st.binary(min_size=1, max_size=8))
    bad = draw(st.sampled_from([b"\xff", b"\xc3(", b"\xed\xa0\x80", b"a\xf4\x90\x80\x80"]))
    if draw(st.booleans()):  # field 7 of field 4
        return payload + bytes([0x22, len(bad) + 2, 0x3A, len(bad)]) + bad
    return payload + bytes([draw(st.sampled_from([0x0A, 0x12, 0x2A, 0x32])), len(bad)]) + bad  # fields 1, 2, 5, 6


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
