"""The replica admin API on both frontends, over a scripted `ReplicaAdmin` that records its
calls: every HTTP route and gRPC method, the contract's errors on either wire, the API key
(the admin calls need it; health stays open), a server with no replicas (501 /
UNIMPLEMENTED), a change that outlives its cancelled call, and a fuzzed drain body."""
from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import math

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from quire.cluster.serving.admin import AdminConflictError, ReplicaAdmin, ReplicaInfo
from quire.cluster.serving.admin_api import replica_admin, replica_from_pb, replica_to_pb
from quire.cluster.serving.api_server import build_app
from quire.cluster.serving.async_engine import AsyncEngine
from quire.cluster.serving.engine_client import ServedModel, StatsSnapshot
from quire.cluster.serving.grpc_server import GrpcFrontend
from quire.protos import admin_pb2 as pb
from quire.protos import admin_pb2_grpc

KEY = "s3cret"
AUTH = {"authorization": f"Bearer {KEY}"}
MAX_GRACE = 3600.0  # the scripted admin's own bound, to see its ValueError on both wires


class SingleEngine:
    """An EngineClient with no replicas to manage (as `AsyncEngine`)."""

    model = ServedModel(name="scripted", tokenizer=None, max_model_len=64, vocab_size=100,
                        eos_token_ids=frozenset({0}), block_size=16, num_kv_blocks=8, tensor_parallel_size=1)
    healthy, failure = True, None

    def stats(self) -> StatsSnapshot:
        return StatsSnapshot(0, 0, 0.0, None)

    def start(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    async def generate(self, prompt, params, request_id=None, *, cache_salt=None, priority=0):
        return
        yield  # an async generator that yields nothing

    def abort(self, request_id: str) -> None:
        pass

    def is_live(self, request_id: str) -> bool:
        return False


def info(name: str, **changes) -> ReplicaInfo:
    return dataclasses.replace(ReplicaInfo(name, "serving", True, 1, 2, 3, 0.25, 7, "local"), **changes)


class ScriptedAdmin(SingleEngine):
    """A router stand-in: replicas in a dict, every call recorded; `delay` seconds per change."""

    def __init__(self, *names: str):
        self.replicas = {name: info(name) for name in names or ("r0", "r1")}
        self.calls: list[tuple] = []
        self.added = 0
        self.delay = 0.0

    def _get(self, name: str) -> ReplicaInfo:
        if name not in self.replicas:
            raise KeyError(name)
        return self.replicas[name]

    def _check(self, grace_seconds: float | None) -> None:
        if grace_seconds is not None and grace_seconds > MAX_GRACE:
            raise ValueError(f"`grace_seconds` must be at most {MAX_GRACE} (got {grace_seconds})")

    def list_replicas(self) -> list[ReplicaInfo]:
        return list(self.replicas.values())

    async def add_replica(self) -> str:
        self.calls.append(("add",))
        await asyncio.sleep(self.delay)
        name = f"new{self.added}"
        self.added += 1
        self.replicas[name] = info(name, node="node-b", num_running=0, live_requests=0, cached_blocks=0)
        return name

    async def drain_replica(self, name: str, grace_seconds: float | None = None) -> None:
        self.calls.append(("drain", name, grace_seconds))
        self._get(name)
        self._check(grace_seconds)
        if len(self.replicas) == 1:
            raise AdminConflictError(f"replica {name} is the last one serving; add another first")
        del self.replicas[name]

    async def remove_replica(self, name: str) -> None:
        self.calls.append(("remove", name))
        self._get(name)
        del self.replicas[name]

    async def rolling_restart(self, grace_seconds: float | None = None) -> list[str]:
        self.calls.append(("restart", grace_seconds))
        self._check(grace_seconds)
        if any(r.state == "draining" for r in self.replicas.values()):
            raise AdminConflictError("a rolling restart is running already")
        fresh = []
        for old in list(self.replicas):
            fresh.append(await self.add_replica())
            del self.replicas[old]
        return fresh


def test_the_scripted_admin_keeps_the_contract_and_a_single_engine_has_none():
    for name, declared in vars(ReplicaAdmin).items():
        if not name.startswith("_") and callable(declared):
            wanted = inspect.signature(declared)
            assert inspect.signature(getattr(ScriptedAdmin, name)) == wanted, name
            assert inspect.iscoroutinefunction(getattr(ScriptedAdmin, name)) == inspect.iscoroutinefunction(declared)
    assert replica_admin(ScriptedAdmin()) is not None
    assert replica_admin(SingleEngine()) is None and replica_admin(AsyncEngine) is None


def test_replica_info_round_trips_through_the_wire():
    replica = info("r7", state="draining", healthy=False, kv_usage=0.123456789, cached_blocks=2 ** 40, node="n1")
    assert replica_from_pb(pb.Replica.FromString(replica_to_pb(replica).SerializeToString())) == replica


# HTTP ------------------------------------------------------------------------------------

async def http_calls(engine, *calls, api_key=None, headers=None):
    """Each (method, path, json body or None) against a fresh app; the responses."""
    transport = httpx.ASGITransport(app=build_app(engine, api_key=api_key))
    async with httpx.AsyncClient(transport=transport, base_url="http://admin", headers=headers) as http:
        return [await http.request(method, path, json=body) for method, path, body in calls]


def test_http_routes_list_add_drain_remove_and_restart():
    admin = ScriptedAdmin("r0", "r1", "r2")
    listed, added, drained, removed, restarted, after = asyncio.run(http_calls(
        admin, ("GET", "/admin/replicas", None), ("POST", "/admin/replicas", None),
        ("POST", "/admin/replicas/r0/drain", {"grace_seconds": 2.5}), ("DELETE", "/admin/replicas/r1", None),
        ("POST", "/admin/rolling-restart", {"grace_seconds": 0}), ("GET", "/admin/replicas", None)))
    assert listed.status_code == 200 and listed.json()["object"] == "list"
    assert listed.json()["data"][0] == {"name": "r0", "state": "serving", "healthy": True, "num_running": 1,
                                        "num_waiting": 2, "live_requests": 3, "kv_usage": 0.25, "cached_blocks": 7,
                                        "node": "local"}
    assert [r["name"] for r in listed.json()["data"]] == ["r0", "r1", "r2"]
    assert (added.status_code, added.json()) == (201, {"name": "new0"})
    assert (drained.status_code, drained.json()) == (200, {"name": "r0", "state": "removed"})
    assert (removed.status_code, removed.json()) == (200, {"name": "r1", "state": "removed"})
    assert restarted.status_code == 200
    assert restarted.json() == {"replaced": ["r2", "new0"], "replicas": ["new1", "new2"]}
    assert [r["name"] for r in after.json()["data"]] == ["new1", "new2"]
    assert admin.calls == [("add",), ("drain", "r0", 2.5), ("remove", "r1"), ("restart", 0.0), ("add",), ("add",)]


def test_http_drain_and_restart_take_no_body_as_the_default_grace():
    admin = ScriptedAdmin("r0", "r1")
    drained, restarted = asyncio.run(http_calls(admin, ("POST", "/admin/replicas/r0/drain", None),
                                                ("POST", "/admin/rolling-restart", None)))
    assert drained.status_code == restarted.status_code == 200
    assert admin.calls[0] == ("drain", "r0", None) and admin.calls[1] == ("restart", None)


def error_of(response: httpx.Response) -> dict:
    return response.json()["error"]


def test_http_errors_map_the_contract():
    admin = ScriptedAdmin("r0")
    unknown, removed_unknown, too_long, bad_type, extra, last, restart_bad = asyncio.run(http_calls(
        admin, ("POST", "/admin/replicas/ghost/drain", None), ("DELETE", "/admin/replicas/ghost", None),
        ("POST", "/admin/replicas/r0/drain", {"grace_seconds": MAX_GRACE + 1}),
        ("POST", "/admin/replicas/r0/drain", {"grace_seconds": True}),
        ("POST", "/admin/rolling-restart", {"grace": 1}),
        ("POST", "/admin/replicas/r0/drain", {}),
        ("POST", "/admin/rolling-restart", {"grace_seconds": -1})))
    for response in (unknown, removed_unknown):
        assert response.status_code == 404
        assert error_of(response)["message"] == "there is no replica named 'ghost'"
        assert error_of(response)["param"] == "name" and error_of(response)["code"] == "replica_not_found"
    assert too_long.status_code == 400 and error_of(too_long)["param"] == "grace_seconds"  # the admin's ValueError
    assert "at most" in error_of(too_long)["message"]
    assert bad_type.status_code == 400 and error_of(bad_type)["param"] == "grace_seconds"
    assert extra.status_code == 400 and error_of(extra)["param"] == "grace"
    assert last.status_code == 409 and "last one serving" in error_of(last)["message"]
    assert error_of(last)["code"] == "conflict"
    assert restart_bad.status_code == 400 and error_of(restart_bad)["param"] == "grace_seconds"
    assert ("restart", -1.0) not in admin.calls  # refused before it reaches the admin


def test_http_without_replicas_answers_501_naming_the_flags():
    responses = asyncio.run(http_calls(
        SingleEngine(), ("GET", "/admin/replicas", None), ("POST", "/admin/replicas", None),
        ("POST", "/admin/replicas/r0/drain", {"grace_seconds": "not even valid"}),
        ("DELETE", "/admin/replicas/r0", None), ("POST", "/admin/rolling-restart", None)))
    for response in responses:
        assert response.status_code == 501, response.text
        assert "--data-parallel-size" in error_of(response)["message"]
        assert "--max-replicas" in error_of(response)["message"]


@pytest.mark.parametrize("engine", [ScriptedAdmin(), SingleEngine()], ids=["router", "single"])
def test_http_admin_routes_need_the_api_key_and_health_stays_open(engine):
    calls = [("GET", "/admin/replicas", None), ("POST", "/admin/replicas", None),
             ("POST", "/admin/replicas/r0/drain", None), ("DELETE", "/admin/replicas/r1", None),
             ("POST", "/admin/rolling-restart", None)]
    refused = asyncio.run(http_calls(engine, *calls, ("GET", "/health", None), api_key=KEY))
    assert [r.status_code for r in refused] == [401] * len(calls) + [200]
    assert error_of(refused[0])["code"] == "invalid_api_key"
    wrong = asyncio.run(http_calls(engine, calls[0], api_key=KEY, headers={"authorization": "Bearer nope"}))
    assert wrong[0].status_code == 401
    allowed = asyncio.run(http_calls(engine, calls[0], api_key=KEY, headers=AUTH))
    assert allowed[0].status_code == (200 if replica_admin(engine) else 501)
    if replica_admin(engine):
        assert engine.calls == []  # no refused call reached the admin


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
                    | st.integers(min_value=2 ** 64, max_value=10 ** 400),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)
GRACE = JSON | st.floats(min_value=0, max_value=MAX_GRACE) | st.floats(max_value=-1e-9)


def valid_grace(value) -> bool:
    """A finite number >= 0 (not a bool), or null."""
    if value is None:
        return True
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value)) and value >= 0
    except OverflowError:  # an integer beyond any float
        return False


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=st.one_of(
    st.fixed_dictionaries({}, optional={"grace_seconds": GRACE}),
    st.fixed_dictionaries({}, optional={"grace_seconds": GRACE}).flatmap(
        lambda fixed: st.dictionaries(st.text(max_size=10).filter(lambda k: k != "grace_seconds"), JSON,
                                      min_size=1, max_size=3).map(lambda extra: {**fixed, **extra})),
    JSON))
def test_a_fuzzed_drain_body_is_200_or_400_with_a_message(body):
    admin = ScriptedAdmin("r0", "r1")
    response = asyncio.run(post_raw(admin, json.dumps(body)))  # NaN and Infinity too, as Python's JSON has them
    event(f"HTTP {response.status_code}")
    if isinstance(body, dict) and set(body) <= {"grace_seconds"} and valid_grace(body.get("grace_seconds")) \
            and (body.get("grace_seconds") or 0) <= MAX_GRACE:
        assert response.status_code == 200, response.text
        assert admin.calls == [("drain", "r0", body.get("grace_seconds"))]
        return
    if body is None:
        assert response.status_code == 200  # JSON null is no body: the default grace
        return
    assert response.status_code == 400, response.text
    assert error_of(response)["message"]
    # Refused before it reaches the admin, unless the admin's own bound refused it.
    assert admin.calls == [] or admin.calls[0][2] > MAX_GRACE
    if isinstance(body, dict) and set(body) == {"grace_seconds"}:
        assert error_of(response)["param"] == "grace_seconds"


async def post_raw(engine, content: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=build_app(engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://admin") as http:
        return await http.post("/admin/replicas/r0/drain", content=content.encode(),
                               headers={"content-type": "application/json"})


# gRPC ------------------------------------------------------------------------------------

async def grpc_calls(engine, calls, api_key=None):
    """Runs `calls(stub, channel)` against a fresh frontend; its result."""
    frontend = GrpcFrontend(engine, "127.0.0.1:0", api_key=api_key)
    await frontend.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{frontend.port}") as channel:
            return await calls(admin_pb2_grpc.AdminStub(channel), channel)
    finally:
        await frontend.stop(0)


async def status_of(call) -> tuple[grpc.StatusCode, str]:
    """The status of `call()` (a call starts when made: one at a time, in order)."""
    try:
        await call()
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details()
    return grpc.StatusCode.OK, ""


def test_grpc_methods_list_add_drain_remove_and_restart():
    admin = ScriptedAdmin("r0", "r1", "r2")

    async def calls(stub, channel):
        return [await stub.ListReplicas(pb.ListReplicasRequest()), await stub.AddReplica(pb.AddReplicaRequest()),
                await stub.DrainReplica(pb.DrainReplicaRequest(name="r0", grace_seconds=2.5)),
                await stub.RemoveReplica(pb.RemoveReplicaRequest(name="r1")),
                await stub.DrainReplica(pb.DrainReplicaRequest(name="r2")),
                await stub.RollingRestart(pb.RollingRestartRequest(grace_seconds=0)),
                await stub.RollingRestart(pb.RollingRestartRequest())]

    listed, added, drained, removed, drained_default, restarted, again = asyncio.run(grpc_calls(admin, calls))
    assert [replica_from_pb(r) for r in listed.replicas] == [info("r0"), info("r1"), info("r2")]
    assert added.name == "new0"
    assert (drained.name, drained.state, removed.name, removed.state) == ("r0", "removed", "r1", "removed")
    assert drained_default.state == "removed"
    assert (list(restarted.replaced), list(restarted.replicas)) == (["new0"], ["new1"])
    assert (list(again.replaced), list(again.replicas)) == (["new1"], ["new2"])
    assert admin.calls == [("add",), ("drain", "r0", 2.5), ("remove", "r1"), ("drain", "r2", None),
                           ("restart", 0.0), ("add",), ("restart", None), ("add",)]


def test_grpc_errors_map_the_contract():
    admin = ScriptedAdmin("r0")

    async def calls(stub, channel):
        return [await status_of(call) for call in (
            lambda: stub.DrainReplica(pb.DrainReplicaRequest(name="ghost")),
            lambda: stub.RemoveReplica(pb.RemoveReplicaRequest(name="ghost")),
            lambda: stub.DrainReplica(pb.DrainReplicaRequest(name="r0", grace_seconds=MAX_GRACE + 1)),
            lambda: stub.DrainReplica(pb.DrainReplicaRequest(name="r0", grace_seconds=float("nan"))),
            lambda: stub.RollingRestart(pb.RollingRestartRequest(grace_seconds=-1)),
            lambda: stub.RollingRestart(pb.RollingRestartRequest(grace_seconds=float("inf"))),
            lambda: stub.DrainReplica(pb.DrainReplicaRequest()),
            lambda: stub.RemoveReplica(pb.RemoveReplicaRequest()),
            lambda: stub.DrainReplica(pb.DrainReplicaRequest(name="r0")),
            # bytes that are no message (a truncated field)
            lambda: channel.unary_unary("/quire.v1.Admin/DrainReplica")(b"\x0a\xff"))]

    (ghost, ghost_removed, too_long, nan, negative, infinite, unnamed, unnamed_removed, last,
     corrupt) = asyncio.run(grpc_calls(admin, calls))
    assert ghost == ghost_removed == (grpc.StatusCode.NOT_FOUND, "there is no replica named 'ghost'")
    assert too_long[0] == grpc.StatusCode.INVALID_ARGUMENT and "`grace_seconds` must be at most" in too_long[1]
    for refused in (nan, negative, infinite):
        assert refused[0] == grpc.StatusCode.INVALID_ARGUMENT and "`grace_seconds`" in refused[1]
    for refused in (unnamed, unnamed_removed):
        assert refused[0] == grpc.StatusCode.INVALID_ARGUMENT and "`name`" in refused[1]
    assert last[0] == grpc.StatusCode.FAILED_PRECONDITION and "last one serving" in last[1]
    assert corrupt[0] == grpc.StatusCode.INVALID_ARGUMENT
    # Only the calls with valid arguments reached the admin.
    assert admin.calls == [("drain", "ghost", None), ("remove", "ghost"), ("drain", "r0", MAX_GRACE + 1),
                           ("drain", "r0", None)]


def test_grpc_without_replicas_is_unimplemented_naming_the_flags():
    async def calls(stub, channel):
        return [await status_of(call) for call in (
            lambda: stub.ListReplicas(pb.ListReplicasRequest()), lambda: stub.AddReplica(pb.AddReplicaRequest()),
            lambda: stub.DrainReplica(pb.DrainReplicaRequest(name="r0")),
            lambda: stub.RemoveReplica(pb.RemoveReplicaRequest(name="r0")),
            lambda: stub.RollingRestart(pb.RollingRestartRequest()))]

    for code, details in asyncio.run(grpc_calls(SingleEngine(), calls)):
        assert code == grpc.StatusCode.UNIMPLEMENTED
        assert "--data-parallel-size" in details and "--max-replicas" in details


def test_grpc_admin_needs_the_api_key_while_health_and_reflection_stay_open():
    admin = ScriptedAdmin()

    async def calls(stub, channel):
        refused = [await status_of(call) for call in (
            lambda: stub.ListReplicas(pb.ListReplicasRequest()), lambda: stub.AddReplica(pb.AddReplicaRequest()),
            lambda: stub.DrainReplica(pb.DrainReplicaRequest(name="r0")),
            lambda: stub.RemoveReplica(pb.RemoveReplicaRequest(name="r0")),
            lambda: stub.RollingRestart(pb.RollingRestartRequest()),
            lambda: stub.ListReplicas(pb.ListReplicasRequest(), metadata=(("authorization", "Bearer nope"),)))]
        allowed = await stub.ListReplicas(pb.ListReplicasRequest(), metadata=tuple(AUTH.items()))
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
        await reflect.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        await reflect.done_writing()
        services = {s.name for answer in [await reflect.read()] for s in answer.list_services_response.service}
        return refused, allowed, health, services

    refused, allowed, health, services = asyncio.run(grpc_calls(admin, calls, api_key=KEY))
    assert {code for code, _ in refused} == {grpc.StatusCode.UNAUTHENTICATED}
    assert [r.name for r in allowed.replicas] == ["r0", "r1"]
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert {"quire.v1.Admin", "quire.v1.Generate", "grpc.health.v1.Health"} <= services
    assert admin.calls == []  # no refused call reached the admin


def test_a_change_outlives_its_cancelled_call():
    """A deadline ends the call, not the change: the replica is added all the same."""
    admin = ScriptedAdmin()
    admin.delay = 0.5

    async def calls(stub, channel):
        status = await status_of(lambda: stub.AddReplica(pb.AddReplicaRequest(), timeout=0.1))
        for _ in range(100):
            if "new0" in admin.replicas:
                break
            await asyncio.sleep(0.05)
        return status

    code, _ = asyncio.run(grpc_calls(admin, calls))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "new0" in admin.replicas
