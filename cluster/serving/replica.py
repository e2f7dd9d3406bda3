"""One data-parallel replica as the router sees it: requests in, batches of updates out.

A replica is a whole quire engine (`AsyncEngine` over an `Engine` with its own workers). A
`ReplicaHost` runs beside it, in whatever process holds it (a Ray actor, or the router's own
process in tests and benchmarks), and turns it into three calls that cross a process
boundary cheaply: `add` a request, `abort` one, and `poll`, which returns everything that
happened since the last poll in one `ReplicaUpdate`: every request's new deltas, the KV
events of its prefix cache, and its load. One poll carries all streams of the replica, so
the cost of talking to a replica grows with its steps, not with its streams × tokens.

The router talks to a host through a `ReplicaHandle` (`InprocReplica` here, `RayReplica` for
an actor); `ReplicaDeadError` from any call means the replica is gone.
"""
from __future__ import annotations

import asyncio
import threading
import uuid
from dataclasses import dataclass, field
from typing import Protocol

from quire.cluster.core.engine import Engine
from quire.cluster.core.kv_events import KVEvent, KVSnapshot
from quire.cluster.core.outputs import RequestOutput
from quire.cluster.serving.async_engine import AsyncEngine
from quire.cluster.serving.engine_client import (
    EngineDeadError,
    QueueFullError,
    RequestFailedError,
    StatsSnapshot,
)
from quire.protos.step import SamplingParams


class ReplicaDeadError(RuntimeError):
    """The replica cannot be reached or has stopped serving: its streams must move."""


@dataclass(frozen=True)
class ReplicaRequest:
    """A request as the router hands it to a replica: already tokenized (the router hashed
    its blocks to choose the replica). `resume_token_ids`: a migrated stream's tokens so far."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: str | None = None
    priority: int = 0
    resume_token_ids: list[int] | None = None


@dataclass(frozen=True)
class ReplicaOutput:
    """One request's news: a delta, or the error that ended it. `error_kind`: invalid (a
    ValueError naming the field), queue_full, failed (the request alone failed), dead (the
    replica failed: the router moves the stream)."""
    request_id: str
    output: RequestOutput | None = None
    error: str | None = None
    error_kind: str | None = None


@dataclass(frozen=True)
class ReplicaUpdate:
    """What happened on a replica since the previous poll. `kv_events` are its prefix cache's
    changes numbered up to `kv_next_seq` (exclusive), from the log of life `kv_epoch` (a new
    epoch: the replica's engine was recreated; resynchronise from a snapshot)."""
    outputs: list[ReplicaOutput]
    kv_events: list[KVEvent]
    kv_next_seq: int
    kv_epoch: str
    stats: StatsSnapshot
    counters: dict[str, int] = field(default_factory=dict)  # the replica's running totals (metrics)


@dataclass(frozen=True)
class ReplicaInspection:
    """A replica's cache state, read between two steps (for tests and operators)."""
    num_blocks: int
    num_free_blocks: int
    num_unfinished: int
    cached_hashes: frozenset = field(default_factory=frozenset)
    num_hit_tokens: int = 0
    num_query_tokens: int = 0
    host_cached_hashes: frozenset = field(default_factory=frozenset)  # the host tier's (empty without one)


class ReplicaHost:
    """Serves one replica's AsyncEngine to a router. The engine must publish KV events
    (`kv_events=True`); the host drains them on the engine loop thread after every step.

    Contracts: `poll` returns each output and event exactly once, in order per request and
    per event log; `kv_snapshot` clears events not yet polled (the snapshot holds them), so
    the caller must not poll concurrently with it. Single consumer: one router."""

    def __init__(self, async_engine: AsyncEngine):
        engine = async_engine.engine
        if engine.kv_events is None:
            raise ValueError("a replica's engine must publish KV events (kv_events=True)")
        self.async_engine = async_engine
        self.epoch = uuid.uuid4().hex
        self._lock = threading.Lock()  # the event buffer: filled on the loop thread, taken on the host's
        self._events: list[KVEvent] = []
        self._next_seq = engine.kv_events.next_seq
        self._outputs: list[ReplicaOutput] = []
        self._tasks: dict[str, asyncio.Task] = {}
        self._wakeup: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        async_engine.on_step = self._drain_events

    @classmethod
    def build(cls, engine: Engine, max_queue_len: int = 0, metrics=None) -> ReplicaHost:
        """A host over a fresh AsyncEngine of `engine`, its loop started."""
        async_engine = AsyncEngine(engine, max_queue_len=max_queue_len, metrics=metrics)
        host = cls(async_engine)
        async_engine.start()
        return host

    def _drain_events(self, engine: Engine) -> None:
        """On the loop thread: move the log's new events into the host's buffer."""
        log = engine.kv_events
        events = log.drain()
        if events or log.next_seq != self._next_seq:
            with self._lock:
                self._events.extend(events)
                self._next_seq = log.next_seq
            self._wake()

    def _wake(self) -> None:
        if self._loop is not None and self._wakeup is not None:
            try:
                self._loop.call_soon_threadsafe(self._wakeup.set)
            except RuntimeError:  # the host's loop is closed
                pass

    def _bind(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._wakeup = asyncio.Event()

    # -- the router's calls ----------------------------------------------------------------
    async def add(self, request: ReplicaRequest) -> None:
        """Queue a request; its deltas (or its refusal) come with the next polls."""
        self._bind()
        if request.request_id in self._tasks:
            self._push(ReplicaOutput(request.request_id, error=f"`request_id` {request.request_id!r} is already in use",
                                     error_kind="invalid"))
            return
        self._tasks[request.request_id] = asyncio.ensure_future(self._consume(request))

    async def _consume(self, request: ReplicaRequest) -> None:
        try:
            stream = self.async_engine.generate(
                request.prompt_token_ids, request.params, request.request_id, cache_salt=request.cache_salt,
                priority=request.priority, resume_token_ids=request.resume_token_ids)
            async for delta in stream:
                if request.prompt is not None:
                    delta.prompt = request.prompt
                self._push(ReplicaOutput(request.request_id, delta))
        except ValueError as error:
            self._push(ReplicaOutput(request.request_id, error=str(error), error_kind="invalid"))
        except QueueFullError as error:
            self._push(ReplicaOutput(request.request_id, error=str(error), error_kind="queue_full"))
        except RequestFailedError as error:
            self._push(ReplicaOutput(request.request_id, error=str(error), error_kind="failed"))
        except EngineDeadError as error:
            self._push(ReplicaOutput(request.request_id, error=str(error), error_kind="dead"))
        except asyncio.CancelledError:  # aborted by the router: the stream's close aborted it in the engine
            pass
        except Exception as error:  # noqa: BLE001 - the request's own failure, reported to its stream
            self._push(ReplicaOutput(request.request_id, error=f"{type(error).__name__}: {error}", error_kind="failed"))
        finally:
            self._tasks.pop(request.request_id, None)

    def _push(self, output: ReplicaOutput) -> None:
        self._outputs.append(output)
        if self._wakeup is not None:
            self._wakeup.set()

    async def abort(self, request_id: str) -> None:
        """End a request without a final output (the router already ended its stream)."""
        task = self._tasks.pop(request_id, None)
        if task is not None:
            task.cancel()

    async def poll(self, timeout: float = 1.0) -> ReplicaUpdate:
        """Wait up to `timeout` seconds for news, then return all of it (possibly none)."""
        self._bind()
        if not self._outputs and not self._events:
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        self._wakeup.clear()
        outputs, self._outputs = self._outputs, []
        with self._lock:
            events, self._events = self._events, []
            next_seq = self._next_seq
        engine = self.async_engine.engine
        # Read off the loop thread without a lock: each is a monotonic int, read atomically.
        counters = {"num_query_tokens": engine.kv.num_query_tokens, "num_hit_tokens": engine.kv.num_hit_tokens,
                    "num_host_hit_tokens": engine.kv.num_host_hit_tokens,
                    "num_preemptions": engine.scheduler.num_preemptions,
                    "num_worker_restarts": engine.num_worker_restarts}
        return ReplicaUpdate(outputs, events, next_seq, self.epoch, self.async_engine.stats(), counters)

    async def kv_snapshot(self) -> KVSnapshot:
        """The replica's whole cache, taken between two steps; events not yet polled are
        dropped (the snapshot reflects them)."""
        def take(engine: Engine) -> KVSnapshot:
            with self._lock:
                self._events.clear()
                snapshot = engine.kv_events.snapshot()
                self._next_seq = snapshot.next_seq
            return snapshot

        return await self.async_engine.call(take)

    async def inspect(self) -> ReplicaInspection:
        """Check the cache's integrity and report its state, between two steps."""
        def read(engine: Engine) -> ReplicaInspection:
            engine.kv.check_integrity()
            kv = engine.kv
            host = frozenset(kv.cpu_pool.cached) if kv.host_tier else frozenset()
            return ReplicaInspection(kv.pool.num_blocks, kv.pool.num_free_blocks, engine.scheduler.num_unfinished,
                                     frozenset(kv.pool.cached), kv.num_hit_tokens, kv.num_query_tokens, host)

        return await self.async_engine.call(read)

    async def warm_up(self) -> None:
        """Run one real step (a one-token prompt, one greedy token) before any traffic, so the
        first request routed here does not pay for first-use costs (allocator, kernels,
        graphs). Its prompt fills no block: the prefix cache, and the mirror, stay empty."""
        self._bind()
        params = SamplingParams(max_tokens=1, temperature=0)
        async for _ in self.async_engine.generate([0], params, f"warm-up-{self.epoch}"):
            pass

    def worker_pids(self) -> list[int]:
        """The process ids of the replica's workers started on this host (none in-process)."""
        executor = self.async_engine.engine.executor
        return list(getattr(executor, "worker_pids", lambda: [])())

    def shutdown(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        self.async_engine.shutdown()


class ReplicaHandle(Protocol):
    """How the router reaches a replica; every call raises ReplicaDeadError once it is gone."""

    replica_id: str

    async def add(self, request: ReplicaRequest) -> None: ...

    async def abort(self, request_id: str) -> None: ...

    async def poll(self, timeout: float) -> ReplicaUpdate: ...

    async def kv_snapshot(self) -> KVSnapshot: ...

    async def inspect(self) -> ReplicaInspection: ...

    async def shutdown(self) -> None: ...


class HostedReplica:
    """The replica calls a `ReplicaHost` in this process answers (the in-process handle and
    the Ray actor's body share them). Once the host has stopped for good every call raises
    ReplicaDeadError, but a poll first hands over what the host still holds (the deltas it
    made, the streams' "dead" errors): fewer tokens to compute again elsewhere."""

    replica_id: str
    host: ReplicaHost

    def stopped_for_good(self) -> str | None:
        """Why the replica will never serve again; None while it serves (also while it
        replaces dead workers: a recorded loop error is final, a worker being down is not)."""
        async_engine = self.host.async_engine
        return async_engine.failure if async_engine.error is not None else None

    def _check(self) -> None:
        why = self.stopped_for_good()
        if why is not None:
            raise ReplicaDeadError(f"replica {self.replica_id} is gone: {why}")

    async def add(self, request: ReplicaRequest) -> None:
        self._check()
        await self.host.add(request)

    async def poll(self, timeout: float) -> ReplicaUpdate:
        if self.stopped_for_good() is not None:
            timeout = 0  # nothing will come but what is there already
        update = await self.host.poll(timeout)
        if not update.outputs:
            self._check()
        return update

    async def kv_snapshot(self) -> KVSnapshot:
        self._check()
        return await self.host.kv_snapshot()

    async def inspect(self) -> ReplicaInspection:
        self._check()
        return await self.host.inspect()


class InprocReplica(HostedReplica):
    """A replica in the router's own process and event loop (tests, benchmarks, and a
    data-parallel deployment on one host without Ray). `kill` makes it fail like a dead one."""

    def __init__(self, replica_id: str, host: ReplicaHost):
        self.replica_id, self.host = replica_id, host
        self._dead: str | None = None

    def stopped_for_good(self) -> str | None:
        return self._dead or super().stopped_for_good()

    def kill(self, why: str = "killed") -> None:
        """Stop the replica at once, as a crash would (its streams are the router's to move)."""
        self._dead = why
        self.host.shutdown()

    async def abort(self, request_id: str) -> None:
        if self._dead is None:
            await self.host.abort(request_id)

    async def shutdown(self) -> None:
        if self._dead is None:
            self._dead = "shut down"
            self.host.shutdown()
