"""The global router: one EngineClient in front of many data-parallel replicas.

The frontends (HTTP, gRPC, `LLM`) talk to it exactly as to one `AsyncEngine`. For each
request it tokenizes the prompt, computes its chained block hashes with the deployment's
shared seed (the replicas' own hashes), asks the routing policy for a replica (see
`routing`) and hands the request over; one poll loop per replica brings back every
stream's deltas, the replica's KV events (applied to the exact `PrefixMirror`, resynced
from a snapshot on a gap or a new epoch) and its load.

Migration: the router keeps, for every sample of every live stream, the tokens the client
has received. When a replica dies (a poll fails, or it reports itself dead), each of its
unfinished samples continues on another replica as a new one-sample request: the same
prompt, `resume_token_ids` = the tokens already streamed (their KV is recomputed there;
they count against `max_tokens`, penalties and the seeded noise by position), so the
client's stream goes on token-exact for greedy and seeded sampling, with nothing lost or
repeated. A `replica_factory` recreates dead replicas; migrations wait for a live replica
while one is being started.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from quire.cluster.core.block_hash import BlockHasher, check_cache_salt
from quire.cluster.core.outputs import RequestOutput
from quire.cluster.serving.engine_client import (
    EngineDeadError,
    QueueFullError,
    RequestFailedError,
    ServedModel,
    StatsSnapshot,
)
from quire.cluster.serving.prefix_mirror import PrefixMirror
from quire.cluster.serving.replica import ReplicaDeadError, ReplicaHandle, ReplicaOutput, ReplicaRequest
from quire.cluster.serving.routed_stream import Placement, RoutedStream
from quire.cluster.serving.routing import ReplicaLoad, make_policy
from quire.protos.step import SamplingParams

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5        # a poll returns at once when there is news, else after this long
RESTART_BACKOFF_SECONDS = (1.0, 30.0)  # first and longest pause between failed restarts (doubling)


def served_model(engine_kwargs: dict, num_kv_blocks: int) -> ServedModel:
    """The facts the frontends need, loaded in the router's process (config and tokenizer,
    no weights); `num_kv_blocks` is each replica's, as they report it."""
    from quire.cluster.core.config import EngineConfig
    from quire.cluster.core.model_info import ModelInfo

    config = EngineConfig.from_kwargs(**engine_kwargs)
    info = ModelInfo.load(config.model)
    return ServedModel(name=info.name, tokenizer=info.tokenizer, max_model_len=info.max_model_len,
                       vocab_size=info.vocab_size, eos_token_ids=frozenset(info.eos_token_ids),
                       block_size=config.cache.block_size, num_kv_blocks=num_kv_blocks,
                       tensor_parallel_size=config.parallel.tensor_parallel_size, encoder=info)


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
class _Replica:
    handle: ReplicaHandle
    load: ReplicaLoad
    state: str = "serving"             # serving | dead
    epoch: str | None = None
    stats: StatsSnapshot = field(default_factory=lambda: StatsSnapshot(0, 0, 0.0, None))
    placements: set[str] = field(default_factory=set)  # sub-request ids live here
    task: asyncio.Task | None = None


class Router:
    """Implements EngineClient over `replicas` (handles in a stable order). Single event loop:
    every method but `model`, `stats`, `healthy` and `failure` runs on the loop that called
    `start`."""

    def __init__(self, replicas: list[ReplicaHandle], model: ServedModel, hash_seed: str, *,
                 policy: str = "cache_aware",
                 replica_factory: Callable[[str], Awaitable[ReplicaHandle]] | None = None,
                 max_queue_len: int = 0, metrics=None, poll_seconds: float = POLL_SECONDS):
        if not replicas:
            raise ValueError("a router needs at least one replica")
        self._model = model
        self.policy = make_policy(policy)
        self.hasher = BlockHasher(model.block_size, bytes.fromhex(hash_seed))
        self.mirror = PrefixMirror()
        self.counters = RouterCounters()
        self.replica_factory = replica_factory
        self.max_queue_len, self.metrics, self.poll_seconds = max_queue_len, metrics, poll_seconds
        self._replicas: dict[str, _Replica] = {h.replica_id: _Replica(h, ReplicaLoad(h.replica_id)) for h in replicas}
        self._placements: dict[str, Placement] = {}
        self._streams: dict[str, RoutedStream] = {}
        self._orphans: list[tuple[RoutedStream, list[int]]] = []  # samples waiting for a live replica
        self._restarting: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False

    # -- EngineClient: facts and health ----------------------------------------------------
    @property
    def model(self) -> ServedModel:
        return self._model

    @property
    def failure(self) -> str | None:
        if self._stopped:
            return "the router was shut down"
        if not any(r.state == "serving" and r.stats.healthy for r in self._replicas.values()):
            return "no replica is serving"
        return None

    @property
    def healthy(self) -> bool:
        return self.failure is None

    def stats(self) -> StatsSnapshot:
        per_replica = tuple(
            StatsSnapshot(r.stats.num_running, r.stats.num_waiting, r.stats.kv_usage,
                          r.stats.failure if r.state == "serving" else f"replica is {r.state}",
                          r.stats.max_queue_len, name=replica_id, state=r.state)
            for replica_id, r in self._replicas.items())
        serving = [s for s in per_replica if s.state == "serving"]
        kv = sum(s.kv_usage for s in serving) / len(serving) if serving else 0.0
        return StatsSnapshot(sum(s.num_running for s in serving), sum(s.num_waiting for s in serving), kv,
                             self.failure, self.max_queue_len, replicas=per_replica)

    def replica_ids(self, state: str = "serving") -> list[str]:
        return [replica_id for replica_id, r in self._replicas.items() if r.state == state]

    def handle(self, replica_id: str) -> ReplicaHandle:
        return self._replicas[replica_id].handle

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start one poll loop per replica on the running event loop (idempotent)."""
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop:
            raise RuntimeError("a router serves one event loop")
        self._loop = loop
        for replica_id, replica in self._replicas.items():
            if replica.task is None and replica.state == "serving":
                replica.task = self._spawn(self._poll_loop(replica_id))

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def shutdown(self) -> None:
        """Stop polling, end every open stream with EngineDeadError, shut the replicas down."""
        if self._stopped:
            return
        self._stopped = True
        for task in list(self._tasks):
            task.cancel()
        for stream in list(self._streams.values()):
            stream.queue.put_nowait(EngineDeadError("the router was shut down"))
        self._streams.clear()
        replicas = [r.handle for r in self._replicas.values() if r.state == "serving"]
        for replica in self._replicas.values():
            replica.state = "stopped"
        if self._loop is not None and not self._loop.is_closed():
            async def stop_all():
                await asyncio.gather(*(h.shutdown() for h in replicas), return_exceptions=True)
            if self._loop.is_running():
                self._spawn(stop_all())
            else:
                self._loop.run_until_complete(stop_all())

    # -- EngineClient: requests ------------------------------------------------------------
    def is_live(self, request_id: str) -> bool:
        return request_id in self._streams

    def abort(self, request_id: str) -> None:
        """End a request: its stream gets a final "abort" output; its replicas free it."""
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        final = stream.abort_output()
        for completion in final.outputs:
            self._record_finish(stream, "abort", completion.index)
        stream.queue.put_nowait(final)
        self._release(stream)

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None, *,
                       cache_salt: str | None = None, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """EngineClient.generate over the replicas: refusals (ValueError, QueueFullError,
        EngineDeadError) come before any output; a replica dying mid-stream is invisible."""
        if self._loop is None:
            self.start()
        if self.failure is not None and not self._restarting:
            raise EngineDeadError(f"the router cannot serve: {self.failure}")
        params.validate(vocab_size=self._model.vocab_size)
        check_cache_salt(cache_salt)
        token_ids = self._model.encoder.encode(prompt)
        if len(token_ids) + 1 > self._model.max_model_len:
            raise ValueError(f"`prompt` has {len(token_ids)} tokens; with at least one output token it exceeds "
                             f"max_model_len={self._model.max_model_len}")
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            raise ValueError(f"`request_id` {request_id!r} is already in use")
        waiting = sum(r.stats.num_waiting for r in self._replicas.values() if r.state == "serving")
        if self.max_queue_len and waiting >= self.max_queue_len:
            self._record("on_rejected", "queue_full")
            raise QueueFullError(f"{waiting} requests are waiting (max_queue_len={self.max_queue_len}); retry later")
        stream = RoutedStream(request_id, prompt if isinstance(prompt, str) else None, token_ids, params, cache_salt,
                         priority, asyncio.Queue(), {index: [] for index in range(params.n)},
                         arrival=asyncio.get_running_loop().time())
        self._streams[request_id] = stream
        self._record("on_admitted", len(token_ids))
        try:
            await self._place(stream, list(range(params.n)), request_id, params, None)
        except BaseException:
            self._fail_stream(stream, EngineDeadError("the request could not be placed"))
            raise
        done = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                stream.started = True
                done = item.finished
                yield item
                if done:
                    return
        finally:
            if not done and self._streams.get(request_id) is stream:
                del self._streams[request_id]
                self._release(stream)
                for index in stream.unfinished():
                    self._record_finish(stream, "abort", index)

    def _record(self, hook: str, *args) -> None:
        if self.metrics is not None:
            getattr(self.metrics, hook)(*args)

    def _record_finish(self, stream: RoutedStream, finish_reason: str, index: int) -> None:
        if self.metrics is not None:
            now = asyncio.get_running_loop().time()
            self.metrics.on_finished(finish_reason, len(stream.tokens[index]), now - stream.arrival,
                                     None if stream.first_token is None else stream.first_token - stream.arrival)

    # -- placement and migration -----------------------------------------------------------
    async def _place(self, stream: RoutedStream, indexes: list[int], sub_id: str, params: SamplingParams,
                     resume: list[int] | None) -> None:
        """Choose a replica for `indexes` of the stream (tokens so far: `resume`) and send it
        there; with none live, park it until one is (or fail the stream when none can come)."""
        token_ids = stream.prompt_token_ids + (resume or [])
        loads = [r.load for r in self._replicas.values() if r.state == "serving"]
        if not loads:
            if self.replica_factory is not None and not self._stopped:
                self._orphans.append((stream, indexes))
                return
            self._fail_stream(stream, EngineDeadError("no replica is serving"))
            return
        max_blocks = (len(token_ids) - 1) // self._model.block_size
        hashes = self.hasher.prefix_hashes(token_ids, stream.cache_salt, max_blocks=max_blocks)
        decision = self.policy.choose(loads, hashes, len(token_ids), self._model.block_size, self.mirror)
        cached_tokens = decision.cached_blocks * self._model.block_size
        counters = self.counters
        counters.decisions[self.policy.name] = counters.decisions.get(self.policy.name, 0) + 1
        counters.predicted_cached_tokens += cached_tokens
        counters.prompt_tokens += len(token_ids)
        if self.metrics is not None:
            self.metrics.on_routed(self.policy.name, str(decision.replica_id), cached_tokens)
        replica = self._replicas[decision.replica_id]
        placement = Placement(sub_id, stream, decision.replica_id, indexes,
                               queued_prefill=max(0, len(token_ids) - cached_tokens))
        self._placements[sub_id] = placement
        replica.placements.add(sub_id)
        replica.load.live_requests += 1
        replica.load.queued_prefill_tokens += placement.queued_prefill
        request = ReplicaRequest(sub_id, stream.prompt, stream.prompt_token_ids, params, stream.cache_salt,
                                 stream.priority, resume)
        try:
            await replica.handle.add(request)
        except ReplicaDeadError as error:
            await self._on_replica_dead(decision.replica_id, str(error))
        except Exception as error:  # noqa: BLE001 - this request could not be sent: it alone fails
            logger.exception("sending %s to replica %s failed", sub_id, decision.replica_id)
            self._unplace(placement)
            self._fail_stream(stream, RequestFailedError(f"the request could not be sent to a replica: {error!r}"))

    def _unplace(self, placement: Placement) -> None:
        self._placements.pop(placement.sub_id, None)
        replica = self._replicas.get(placement.replica_id)
        if replica is not None and placement.sub_id in replica.placements:
            replica.placements.discard(placement.sub_id)
            replica.load.live_requests -= 1
            replica.load.queued_prefill_tokens -= placement.queued_prefill
            placement.queued_prefill = 0

    def _release(self, stream: RoutedStream) -> None:
        """Forget a stream that ended early, aborting its live placements on their replicas."""
        self._orphans = [(s, i) for s, i in self._orphans if s is not stream]
        for placement in [p for p in self._placements.values() if p.stream is stream]:
            self._unplace(placement)
            replica = self._replicas.get(placement.replica_id)
            if replica is not None and replica.state == "serving":
                self._spawn(self._abort_quietly(replica.handle, placement.sub_id))

    @staticmethod
    async def _abort_quietly(handle: ReplicaHandle, sub_id: str) -> None:
        try:
            await handle.abort(sub_id)
        except ReplicaDeadError:
            pass  # its poll loop finds the replica dead and handles it

    @staticmethod
    async def _shutdown_quietly(handle: ReplicaHandle) -> None:
        try:
            await handle.shutdown()
        except Exception:  # noqa: BLE001 - it is gone either way
            logger.debug("shutting a dead replica down failed", exc_info=True)

    async def _migrate(self, placement: Placement) -> None:
        """Continue the placement's unfinished samples elsewhere, one request per sample."""
        stream = placement.stream
        if self._streams.get(stream.request_id) is not stream:
            return
        for index in stream.unfinished(placement.indexes):
            self.counters.migrations += 1
            self._record("on_migrated")
            await self._place(stream, [index], *stream.continuation(index))

    async def _on_replica_dead(self, replica_id: str, why: str) -> None:
        replica = self._replicas.get(replica_id)
        if replica is None or replica.state != "serving":
            return
        logger.error("replica %s is gone (%s); moving %d streams", replica_id, why, len(replica.placements))
        replica.state = "dead"
        if self.metrics is not None:
            self.metrics.publish_replica(replica_id, False, 0, 0, 0.0, {})
        if replica.task is not None and replica.task is not asyncio.current_task():
            replica.task.cancel()
        self.mirror.remove_replica(replica_id)
        # A replica that stopped answering may still be computing: stop it for good, so it
        # frees its resources and no stream ever has two producers.
        self._spawn(self._shutdown_quietly(replica.handle))
        moved = [self._placements[sub_id] for sub_id in sorted(replica.placements) if sub_id in self._placements]
        for placement in moved:
            self._unplace(placement)
        if self.replica_factory is not None and not self._stopped:
            self._restarting.add(replica_id)
            self._spawn(self._restart(replica_id))
        for placement in moved:
            await self._migrate(placement)

    async def _restart(self, replica_id: str) -> None:
        """Recreate a dead replica through the factory (retrying), then serve parked samples."""
        pause, longest = RESTART_BACKOFF_SECONDS
        try:
            while not self._stopped:
                try:
                    handle = await self.replica_factory(replica_id)
                    break
                except Exception:  # noqa: BLE001 - logged; retried after a growing pause
                    logger.exception("restarting replica %s failed; retrying in %.0fs", replica_id, pause)
                    await asyncio.sleep(pause)
                    pause = min(2 * pause, longest)
            else:
                return
            self.counters.replica_restarts += 1
            replica = self._replicas[replica_id] = _Replica(handle, ReplicaLoad(replica_id))
            replica.task = self._spawn(self._poll_loop(replica_id))
        finally:
            self._restarting.discard(replica_id)
        orphans, self._orphans = self._orphans, []
        for stream, indexes in orphans:
            for index in stream.unfinished(indexes):
                await self._place(stream, [index], *stream.continuation(index))

    # -- the poll loop ---------------------------------------------------------------------
    async def _poll_loop(self, replica_id: str) -> None:
        replica = self._replicas[replica_id]
        handle = replica.handle
        try:
            while replica.state == "serving":
                update = await handle.poll(self.poll_seconds)
                replica.stats = update.stats
                replica.load.kv_usage = update.stats.kv_usage
                if self.metrics is not None:
                    self.metrics.publish_replica(replica_id, True, update.stats.num_running, update.stats.num_waiting,
                                                 update.stats.kv_usage, update.counters)
                if replica.epoch != update.kv_epoch or not self.mirror.apply(
                        replica_id, update.kv_events, update.kv_next_seq):
                    snapshot = await handle.kv_snapshot()
                    self.mirror.resync(replica_id, snapshot)
                    if replica.epoch is not None:
                        self.counters.mirror_resyncs += 1
                        if self.metrics is not None:
                            self.metrics.on_mirror_resync()
                    replica.epoch = update.kv_epoch
                dead = None
                for output in update.outputs:
                    if output.error_kind == "dead":
                        dead = output.error
                    else:
                        self._deliver(output)
                if dead is not None:
                    await self._on_replica_dead(replica_id, dead)
        except ReplicaDeadError as error:
            await self._on_replica_dead(replica_id, str(error))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - a replica we cannot read is a replica we cannot use
            logger.exception("polling replica %s failed", replica_id)
            await self._on_replica_dead(replica_id, f"{type(error).__name__}: {error}")

    def _deliver(self, news: ReplicaOutput) -> None:
        """Hand a replica's news on to its stream, in the client's sample indexes."""
        placement = self._placements.get(news.request_id)
        if placement is None:
            return  # its stream ended (aborted, or moved on)
        stream = placement.stream
        if news.error_kind is not None:
            self._unplace(placement)
            if not stream.started and stream.generation == 0 and news.error_kind == "invalid":
                error: BaseException = ValueError(news.error)
            elif not stream.started and stream.generation == 0 and news.error_kind == "queue_full":
                error = QueueFullError(news.error)
            else:
                error = RequestFailedError(news.error)
            self._fail_stream(stream, error)
            return
        output = news.output
        if placement.queued_prefill and any(c.token_ids for c in output.outputs):
            replica = self._replicas.get(placement.replica_id)
            if replica is not None and news.request_id in replica.placements:
                replica.load.queued_prefill_tokens -= placement.queued_prefill
            placement.queued_prefill = 0
        delta, new_tokens = stream.accept(placement.indexes, output)
        for completion in delta.outputs:
            if completion.finish_reason is not None:
                self._record_finish(stream, completion.finish_reason, completion.index)
        if new_tokens and stream.first_token is None:
            stream.first_token = asyncio.get_running_loop().time()
            self._record("on_first_token", stream.first_token - stream.arrival)
        if new_tokens:
            self._record("on_tokens", new_tokens)
        if output.finished:
            self._unplace(placement)
        if delta.finished:
            self._streams.pop(stream.request_id, None)
        stream.queue.put_nowait(delta)

    def _fail_stream(self, stream: RoutedStream, error: BaseException) -> None:
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]
            self._release(stream)
        stream.queue.put_nowait(error)
