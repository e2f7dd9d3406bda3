"""The replica admin API of both frontends, over a `ReplicaAdmin` (the router): HTTP routes
under `/admin` (`add_admin_routes`) and the gRPC service `quire.v1.Admin` (`AdminServicer`).

    GET    /admin/replicas               ListReplicas    every replica: state, load, KV usage, cache, node
    POST   /admin/replicas               AddReplica      201 {"name"}, once the new replica serves
    POST   /admin/replicas/{name}/drain  DrainReplica    {"name", "state": "removed"}, once it is gone
    DELETE /admin/replicas/{name}        RemoveReplica   {"name", "state": "removed"}, its requests moved
    POST   /admin/rolling-restart        RollingRestart  {"replaced": [...], "replicas": [...]}

A drain and a rolling restart take an optional body `{"grace_seconds": float >= 0}` (gRPC:
the optional field). Contracts: the frontends serve these behind their API key. An unknown
replica is 404 / NOT_FOUND; a bad argument 400 / INVALID_ARGUMENT with a message naming the
field; a conflict with the deployment's state or bounds 409 / FAILED_PRECONDITION; a server
with no replicas to manage (a single engine) answers every call with 501 / UNIMPLEMENTED. A
change, once started, runs to its end even if the client hangs up or the call passes its
deadline: the answer is lost, never the consistency of the deployment.
"""
from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from quire.cluster.serving.admin import AdminConflictError, ReplicaAdmin, ReplicaInfo
from quire.cluster.serving.api_server import APIError, _param_of
from quire.cluster.serving.engine_client import EngineDeadError
from quire.cluster.serving.grpc_server import _abort
from quire.protos import admin_pb2 as pb
from quire.protos import admin_pb2_grpc

logger = logging.getLogger(__name__)

NO_REPLICAS = ("this server runs a single engine, with no replicas to manage: start it with "
               "`--data-parallel-size` N (N > 1) or `--max-replicas` N to serve through a router")
T = TypeVar("T")


def replica_admin(engine: Any) -> ReplicaAdmin | None:
    """The engine as a `ReplicaAdmin` when it is one (it has every call), else None."""
    calls = ("list_replicas", "add_replica", "drain_replica", "remove_replica", "rolling_restart")
    return engine if all(callable(getattr(engine, call, None)) for call in calls) else None


def replica_to_pb(info: ReplicaInfo) -> pb.Replica:
    return pb.Replica(**dataclasses.asdict(info))


def replica_from_pb(message: pb.Replica) -> ReplicaInfo:
    return ReplicaInfo(**{field.name: getattr(message, field.name) for field in dataclasses.fields(ReplicaInfo)})


# Changes in flight whose caller went away: held here so that they are not collected before
# they end (the event loop keeps only weak references to tasks).
_ORPHANS: set[asyncio.Task] = set()


def _log_orphan(task: asyncio.Task) -> None:
    _ORPHANS.discard(task)
    if not task.cancelled() and task.exception() is not None:
        logger.error("an admin change whose caller went away failed: %r", task.exception())


async def run_to_end(change: Awaitable[T]) -> T:
    """Awaits `change`, which goes on to its end if the caller is cancelled (a client hanging
    up, a gRPC deadline): a replica half added or a restart half done would be worse than an
    answer nobody reads."""
    task = asyncio.ensure_future(change)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        _ORPHANS.add(task)
        task.add_done_callback(_log_orphan)
        raise


async def restart_all(admin: ReplicaAdmin, grace_seconds: float | None) -> tuple[list[str], list[str]]:
    """A rolling restart: (the replicas serving when it began, which it replaces; the fresh ones)."""
    before = [info.name for info in admin.list_replicas() if info.state == "serving"]
    fresh = list(await admin.rolling_restart(grace_seconds=grace_seconds))
    return [name for name in before if name not in fresh], fresh


@dataclasses.dataclass(frozen=True)
class Wire:
    """What one failure of the contract is on either wire."""
    status: int
    grpc_code: grpc.StatusCode
    code: str                            # the HTTP error's `code`
    type: str = "invalid_request_error"  # the HTTP error's `type`


FAILURES: dict[type[Exception], Wire] = {
    KeyError: Wire(404, grpc.StatusCode.NOT_FOUND, "replica_not_found"),
    ValueError: Wire(400, grpc.StatusCode.INVALID_ARGUMENT, "invalid_value"),
    AdminConflictError: Wire(409, grpc.StatusCode.FAILED_PRECONDITION, "conflict"),
    # The router was shut down under the call.
    EngineDeadError: Wire(503, grpc.StatusCode.UNAVAILABLE, "service_unavailable", "service_unavailable"),
}


def _failure(error: Exception, name: str | None) -> tuple[Wire, str, str | None]:
    """(its wire, message, the field it names) of one of FAILURES."""
    wire = next(wire for kind, wire in FAILURES.items() if isinstance(error, kind))
    if isinstance(error, KeyError):  # str() of a KeyError is its argument's repr: say it plainly
        said = str(error.args[0]) if error.args else ""
        if name is not None and said in ("", name):
            said = f"there is no replica named {name!r}"
        return wire, said or "no such replica", "name"
    return wire, str(error), _param_of(str(error))


async def _call(call: Callable[[], Any]) -> Any:
    """`call()`, awaited to its end when it is a change."""
    result = call()
    return await run_to_end(result) if inspect.isawaitable(result) else result


# HTTP ------------------------------------------------------------------------------------

class GraceBody(BaseModel):
    """The optional body of a drain and of a rolling restart."""
    model_config = ConfigDict(extra="forbid")

    # How long a drained replica's requests may run on there before the rest move; strict:
    # a bool or a string is refused, not read as a number. None: the server's default.
    grace_seconds: float | None = Field(None, ge=0, allow_inf_nan=False, strict=True)


def add_admin_routes(app: FastAPI, engine: Any) -> None:
    """Mount the `/admin` routes on `app` (whose middleware checks the API key). Over an
    engine that is no `ReplicaAdmin`, every `/admin` path answers 501 naming the flags that
    start a server with replicas."""
    admin = replica_admin(engine)
    if admin is None:
        @app.api_route("/admin/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                       include_in_schema=False)
        async def no_replicas(path: str):
            raise APIError(501, NO_REPLICAS, code="not_implemented")
        return

    async def change(call: Callable[[], Any], name: str | None = None) -> Any:
        try:
            return await _call(call)
        except tuple(FAILURES) as error:
            wire, message, param = _failure(error, name)
            raise APIError(wire.status, message, param, wire.type, wire.code) from None

    def grace(body: GraceBody | None) -> float | None:
        return None if body is None else body.grace_seconds

    @app.get("/admin/replicas")
    async def list_replicas():
        """Every replica the router knows, in its order."""
        infos = await change(admin.list_replicas)
        return {"object": "list", "data": [dataclasses.asdict(info) for info in infos]}

    @app.post("/admin/replicas", status_code=201)
    async def add_replica():
        """One more replica; answers once it serves."""
        return {"name": await change(admin.add_replica)}

    @app.post("/admin/replicas/{name}/drain")
    async def drain_replica(name: str, body: GraceBody | None = None):
        """Drain a replica; answers once it is gone."""
        await change(lambda: admin.drain_replica(name, grace_seconds=grace(body)), name)
        return {"name": name, "state": "removed"}

    @app.delete("/admin/replicas/{name}")
    async def remove_replica(name: str):
        """Remove a replica at once, moving its requests."""
        await change(lambda: admin.remove_replica(name), name)
        return {"name": name, "state": "removed"}

    @app.post("/admin/rolling-restart")
    async def rolling_restart(body: GraceBody | None = None):
        """Replace every replica, one at a time; answers once all are replaced."""
        replaced, fresh = await change(lambda: restart_all(admin, grace(body)))
        return {"replaced": replaced, "replicas": fresh}


# gRPC ------------------------------------------------------------------------------------

def _check_grace(request) -> float | None:
    """The request's `grace_seconds` (None when unset); ValueError naming it when it is not a
    finite number >= 0 (a double on the wire may be NaN, infinite or negative)."""
    if not request.HasField("grace_seconds"):
        return None
    value = request.grace_seconds
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"`grace_seconds` must be a finite number >= 0 (got {value!r})")
    return value


def _check_name(request) -> str:
    if not request.name:
        raise ValueError("`name` must be set: a replica's id, as ListReplicas gives it")
    return request.name


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """`quire.v1.Admin` over an engine; every call is UNIMPLEMENTED when it is no `ReplicaAdmin`."""

    def __init__(self, engine: Any):
        self.admin = replica_admin(engine)

    async def _run(self, context: grpc.aio.ServicerContext, call: Callable[[ReplicaAdmin], Any],
                   name: str | None = None) -> Any:
        """`call(admin)`'s result; a failure of the contract aborts the call with its status."""
        if self.admin is None:
            await _abort(context, grpc.StatusCode.UNIMPLEMENTED, NO_REPLICAS)
        try:
            return await _call(lambda: call(self.admin))
        except tuple(FAILURES) as error:
            failed = error
        wire, message, _ = _failure(failed, name)
        await _abort(context, wire.grpc_code, message)

    async def ListReplicas(self, request: pb.ListReplicasRequest, context):
        infos = await self._run(context, lambda admin: admin.list_replicas())
        return pb.ListReplicasResponse(replicas=[replica_to_pb(info) for info in infos])

    async def AddReplica(self, request: pb.AddReplicaRequest, context):
        return pb.AddReplicaResponse(name=await self._run(context, lambda admin: admin.add_replica()))

    async def DrainReplica(self, request: pb.DrainReplicaRequest, context):
        await self._run(context, lambda admin: admin.drain_replica(_check_name(request),
                                                                   grace_seconds=_check_grace(request)),
                        request.name)
        return pb.DrainReplicaResponse(name=request.name, state="removed")

    async def RemoveReplica(self, request: pb.RemoveReplicaRequest, context):
        await self._run(context, lambda admin: admin.remove_replica(_check_name(request)), request.name)
        return pb.RemoveReplicaResponse(name=request.name, state="removed")

    async def RollingRestart(self, request: pb.RollingRestartRequest, context):
        replaced, fresh = await self._run(context, lambda admin: restart_all(admin, _check_grace(request)))
        return pb.RollingRestartResponse(replaced=replaced, replicas=fresh)
