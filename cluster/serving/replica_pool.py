"""The router's replicas: handles, states, loads, the exact prefix mirror, a poll loop per
replica, and the replacement of dead ones.

The pool knows replicas, not streams: it tells its owner (the router) of every output a
replica sends (`on_news`), of a replica gone with the requests it held (`on_dead`: the
owner moves them) and of a replica (back) in service (`on_ready`). The loads it keeps are
the router's own counts, exact at every decision: requests placed on a replica and not
finished, and their prompt tokens not yet computed; the replica's KV usage comes from its
last poll.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from quire.cluster.serving.admin import AdminConflictError
from quire.cluster.serving.engine_client import StatsSnapshot
from quire.cluster.serving.prefix_mirror import PrefixMirror
from quire.cluster.serving.replica import ReplicaDeadError, ReplicaHandle, ReplicaOutput
from quire.cluster.serving.routing import ReplicaLoad

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5        # a poll returns at once when there is news, else after this long
RESTART_BACKOFF_SECONDS = (1.0, 30.0)  # first and longest pause between failed restarts (doubling)


@dataclass
class RouterCounters:
    """What the router did, for metrics and benchmarks."""
    decisions: dict[str, int] = field(default_factory=dict)  # by policy
    predicted_cached_tokens: int = 0   # prompt tokens the mirror said the chosen replica held
    prompt_tokens: int = 0
    migrations: int = 0                # samples moved to another replica
    mirror_resyncs: int = 0
    replica_restarts: int = 0


@dataclass
class ReplicaRecord:
    handle: ReplicaHandle | None       # None while starting
    load: ReplicaLoad
    state: str = "serving"             # starting | serving | draining | dead (being replaced) | stopped
    epoch: str | None = None           # of the KV event log the mirror follows
    stats: StatsSnapshot = field(default_factory=lambda: StatsSnapshot(0, 0, 0.0, None))
    placements: dict[str, int] = field(default_factory=dict)  # request id here → its queued prefill tokens
    task: asyncio.Task | None = None


class ReplicaPool:
    """Owned by one router, on its event loop. `factory(replica_id)` (optional) recreates a
    dead replica; while it runs, `restarting` is true."""

    def __init__(self, handles: list[ReplicaHandle], *, on_news: Callable[[ReplicaOutput], None],
                 on_dead: Callable[[list[str]], Awaitable[None]], on_ready: Callable[[], Awaitable[None]],
                 factory: Callable[[str], Awaitable[ReplicaHandle]] | None = None,
                 poll_seconds: float = POLL_SECONDS, metrics=None, counters: RouterCounters | None = None):
        if not handles:
            raise ValueError("a router needs at least one replica")
        self.records = {h.replica_id: ReplicaRecord(h, ReplicaLoad(h.replica_id)) for h in handles}
        self.mirror = PrefixMirror()
        self.factory, self.poll_seconds, self.metrics = factory, poll_seconds, metrics
        self.counters = counters or RouterCounters()
        self._on_news, self._on_dead, self._on_ready = on_news, on_dead, on_ready
        self._restarting: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self._next_index = len(handles)  # names of added replicas: replica-<index>
        self.stopped = False

    # -- views -----------------------------------------------------------------------------
    @property
    def restarting(self) -> bool:
        return bool(self._restarting)

    def ids(self, state: str = "serving") -> list[str]:
        return [replica_id for replica_id, r in self.records.items() if r.state == state]

    def serving_loads(self) -> list[ReplicaLoad]:
        return [r.load for r in self.records.values() if r.state == "serving"]

    def node(self, replica_id: str) -> str:
        handle = self.records[replica_id].handle
        return str(getattr(handle, "node", None) or "local")

    def num_waiting(self) -> int:
        """Requests the serving replicas reported queued at their last poll."""
        return sum(r.stats.num_waiting for r in self.records.values() if r.state == "serving")

    def any_healthy(self) -> bool:
        return any(r.state == "serving" and r.stats.healthy for r in self.records.values())

    def stats(self) -> tuple[StatsSnapshot, ...]:
        return tuple(
            StatsSnapshot(r.stats.num_running, r.stats.num_waiting, r.stats.kv_usage,
                          r.stats.failure if r.state == "serving" else f"replica is {r.state}",
                          r.stats.max_queue_len, name=replica_id, state=r.state)
            for replica_id, r in self.records.items())

    # -- load bookkeeping ------------------------------------------------------------------
    def assign(self, replica_id: str, request_id: str, queued_prefill: int) -> None:
        record = self.records[replica_id]
        record.placements[request_id] = queued_prefill
        record.load.live_requests += 1
        record.load.queued_prefill_tokens += queued_prefill

    def prefill_done(self, replica_id: str, request_id: str) -> None:
        """The request's first token came: its prompt no longer waits to be computed."""
        record = self.records.get(replica_id)
        if record is not None and record.placements.get(request_id):
            record.load.queued_prefill_tokens -= record.placements[request_id]
            record.placements[request_id] = 0

    def release(self, replica_id: str, request_id: str) -> bool:
        """Forget a request placed on the replica; returns whether it was there."""
        record = self.records.get(replica_id)
        if record is None or request_id not in record.placements:
            return False
        record.load.queued_prefill_tokens -= record.placements.pop(request_id)
        record.load.live_requests -= 1
        return True

    # -- lifecycle -------------------------------------------------------------------------
    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def start(self) -> None:
        """One poll loop per serving replica, on the running loop (idempotent)."""
        for replica_id, record in self.records.items():
            if record.task is None and record.state == "serving":
                record.task = self._spawn(self._poll_loop(replica_id))

    def shutdown(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Stop polling and shut every serving replica down (on `loop`, if it is still open)."""
        self.stopped = True
        for task in list(self._tasks):
            task.cancel()
        handles = [r.handle for r in self.records.values() if r.state in ("serving", "draining")]
        for record in self.records.values():
            record.state = "stopped"
        if loop is None or loop.is_closed():
            return

        async def stop_all():
            await asyncio.gather(*(h.shutdown() for h in handles), return_exceptions=True)

        if loop.is_running():
            self._spawn(stop_all())
        else:
            loop.run_until_complete(stop_all())

    def abort(self, replica_id: str, request_id: str) -> None:
        """Tell a serving replica to drop a request (a dead one has dropped it already)."""
        record = self.records.get(replica_id)
        if record is not None and record.state in ("serving", "draining"):
            self._spawn(_quietly(record.handle.abort(request_id)))

    # -- failures --------------------------------------------------------------------------
    async def mark_dead(self, replica_id: str, why: str) -> None:
        """Take a replica out of service: stop it for good (a hung one may still compute: no
        stream may get two producers), forget its cache, start its replacement, and hand
        the requests it held to `on_dead`."""
        record = self.records.get(replica_id)
        if record is None or record.state not in ("serving", "draining"):
            return
        logger.error("replica %s is gone (%s); moving %d requests", replica_id, why, len(record.placements))
        replace = record.state == "serving"  # a replica being drained was leaving anyway
        record.state = "dead"
        if self.metrics is not None:
            self.metrics.publish_replica(replica_id, False, 0, 0, 0.0, {})
        if record.task is not None and record.task is not asyncio.current_task():
            record.task.cancel()
        self.mirror.remove_replica(replica_id)
        self._spawn(_quietly(record.handle.shutdown()))
        moved = sorted(record.placements)
        for request_id in moved:
            self.release(replica_id, request_id)
        if self.factory is not None and not self.stopped and replace:
            self._restarting.add(replica_id)
            self._spawn(self._restart(replica_id))
        elif not replace:
            del self.records[replica_id]
        await self._on_dead(moved)

    async def _restart(self, replica_id: str) -> None:
        """Recreate a dead replica through the factory, retrying after growing pauses."""
        pause, longest = RESTART_BACKOFF_SECONDS
        try:
            while not self.stopped:
                try:
                    handle = await self.factory(replica_id)
                    break
                except Exception:  # noqa: BLE001 - logged; retried
                    logger.exception("restarting replica %s failed; retrying in %.0fs", replica_id, pause)
                    await asyncio.sleep(pause)
                    pause = min(2 * pause, longest)
            else:
                return
            self.counters.replica_restarts += 1
            record = self.records[replica_id] = ReplicaRecord(handle, ReplicaLoad(replica_id))
            record.task = self._spawn(self._poll_loop(replica_id))
        finally:
            self._restarting.discard(replica_id)
        await self._on_ready()

    # -- growing and shrinking -------------------------------------------------------------
    def new_name(self) -> str:
        while f"replica-{self._next_index}" in self.records:
            self._next_index += 1
        self._next_index += 1
        return f"replica-{self._next_index - 1}"

    async def add(self) -> str:
        """Start one more replica through the factory; returns its name once it serves (the
        factory returns a replica whose model is loaded and has run a warm-up step). While
        it starts it is listed as starting and takes no request."""
        if self.factory is None:
            raise AdminConflictError("this router cannot start replicas (it has no replica factory)")
        replica_id = self.new_name()
        self.records[replica_id] = ReplicaRecord(None, ReplicaLoad(replica_id), state="starting")
        try:
            handle = await self.factory(replica_id)
        except BaseException:
            self.records.pop(replica_id, None)
            raise
        if self.stopped or self.records.get(replica_id) is None:
            await _quietly(handle.shutdown())
            raise AdminConflictError(f"the router stopped while replica {replica_id} started")
        record = self.records[replica_id] = ReplicaRecord(handle, ReplicaLoad(replica_id))
        record.task = self._spawn(self._poll_loop(replica_id))
        logger.info("replica %s serves", replica_id)
        await self._on_ready()
        return replica_id

    async def drain(self, replica_id: str, grace_seconds: float) -> None:
        """Take a serving replica out of rotation: it takes no new request, its requests
        finish there for up to `grace_seconds`, the rest move elsewhere (`on_dead`), then it
        is shut down and forgotten. Refused for the last serving replica."""
        record = self.records[replica_id]  # KeyError: unknown
        if record.state != "serving":
            raise AdminConflictError(f"replica {replica_id} is {record.state}, not serving")
        if self.ids("serving") == [replica_id]:
            raise AdminConflictError(f"replica {replica_id} is the last serving replica")
        record.state = "draining"
        logger.info("draining replica %s (%d requests, grace %.1fs)", replica_id, len(record.placements),
                    grace_seconds)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_seconds
        while record.placements and record.state == "draining" and loop.time() < deadline:
            await asyncio.sleep(min(0.05, max(deadline - loop.time(), 0)))
        if record.state != "draining":
            return  # it died meanwhile: its requests were moved then
        record.state = "stopped"
        if record.task is not None:
            record.task.cancel()
        moved = sorted(record.placements)
        for request_id in moved:
            self.release(replica_id, request_id)
        # Stopped before its requests move: no stream may get two producers.
        await _quietly(record.handle.shutdown())
        self.mirror.remove_replica(replica_id)
        self.records.pop(replica_id, None)
        if self.metrics is not None:
            self.metrics.publish_replica(replica_id, False, 0, 0, 0.0, {})
        await self._on_dead(moved)

    # -- polling ---------------------------------------------------------------------------
    async def _poll_loop(self, replica_id: str) -> None:
        record = self.records[replica_id]
        handle = record.handle
        try:
            while record.state in ("serving", "draining"):
                update = await handle.poll(self.poll_seconds)
                record.stats = update.stats
                record.load.kv_usage = update.stats.kv_usage
                if self.metrics is not None:
                    self.metrics.publish_replica(replica_id, True, update.stats.num_running, update.stats.num_waiting,
                                                 update.stats.kv_usage, update.counters)
                if record.epoch != update.kv_epoch or not self.mirror.apply(
                        replica_id, update.kv_events, update.kv_next_seq):
                    # A new engine, or events lost: the snapshot holds everything not yet polled.
                    self.mirror.resync(replica_id, await handle.kv_snapshot())
                    if record.epoch is not None:
                        self.counters.mirror_resyncs += 1
                        if self.metrics is not None:
                            self.metrics.on_mirror_resync()
                    record.epoch = update.kv_epoch
                dead = None
                for output in update.outputs:
                    if output.error_kind == "dead":
                        dead = output.error
                    else:
                        self._on_news(output)
                if dead is not None:
                    await self.mark_dead(replica_id, dead)
        except ReplicaDeadError as error:
            await self.mark_dead(replica_id, str(error))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - a replica we cannot read is a replica we cannot use
            logger.exception("polling replica %s failed", replica_id)
            await self.mark_dead(replica_id, f"{type(error).__name__}: {error}")


async def _quietly(call: Awaitable) -> None:
    """Await a call to a replica that may be gone; it is handled by its poll loop either way."""
    try:
        await call
    except Exception:  # noqa: BLE001
        logger.debug("a call to a replica failed", exc_info=True)
