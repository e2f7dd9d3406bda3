"""The replica admin contract: what an operator may do to a data-parallel deployment.

The router implements it; both frontends expose it (HTTP under `/admin`, gRPC service
`quire.v1.Admin`), behind the API key. A single engine (no router) has no replicas to
manage: the frontends answer that the call is not available there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class AdminConflictError(RuntimeError):
    """The operation contradicts the deployment's state or bounds (HTTP 409, gRPC
    FAILED_PRECONDITION): e.g. draining the last serving replica, or a rolling restart while
    one runs."""


@dataclass(frozen=True)
class ReplicaInfo:
    """One replica as an operator sees it."""
    name: str
    state: str              # starting | serving | draining | dead (being replaced) | stopped
    healthy: bool
    num_running: int        # as the replica last reported
    num_waiting: int
    live_requests: int      # routed there by the router and not finished (exact)
    kv_usage: float         # share of its KV blocks in use, 0..1
    cached_blocks: int      # blocks of its prefix cache, from the router's mirror
    node: str               # where it runs (a Ray node id, or "local")


class ReplicaAdmin(Protocol):
    """Contracts: names are the replicas' ids (`list_replicas`); an unknown name raises
    KeyError; a bad argument ValueError naming it; a conflict AdminConflictError. Every
    call returns once its change is done: `add_replica` when the new replica serves (its
    model loaded, a warm-up step run), `drain_replica` when the replica is gone (its
    requests finished there, or moved elsewhere once `grace_seconds` passed), and
    `rolling_restart` when every replica of the start has been replaced, one at a time,
    by a fresh one that served before the old one was drained."""

    def list_replicas(self) -> list[ReplicaInfo]: ...

    async def add_replica(self) -> str: ...

    async def drain_replica(self, name: str, grace_seconds: float | None = None) -> None: ...

    async def remove_replica(self, name: str) -> None: ...

    async def rolling_restart(self, grace_seconds: float | None = None) -> list[str]: ...
