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
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from quire.cluster.core.block_hash import BlockHasher, check_cache_salt
from quire.cluster.core.outputs import RequestOutput
from quire.cluster.serving.engine_client import (
    EngineDeadError,
    QueueFullError,
    RequestFailedError,
    ServedModel,
    StatsSnapshot,
)
from quire.cluster.serving.replica import ReplicaDeadError, ReplicaHandle, ReplicaOutput, ReplicaRequest
from quire.cluster.serving.routed_stream import Placement, RoutedStream
from quire.cluster.serving.admin import AdminConflictError, ReplicaInfo
from quire.cluster.serving.autoscaler import AutoscaleConfig, Autoscaler
from quire.cluster.serving.replica_pool import POLL_SECONDS, ReplicaPool, RouterCounters
from quire.cluster.serving.routing import make_policy
from quire.protos.step import SamplingParams

logger = logging.getLogger(__name__)


def served_model(engine_kwargs: dict, num_kv_blocks: int) -> ServedModel:
    """The facts the frontends need, loaded in the router's process (config and tokenizer,
    no weights); `num_kv_blocks` is each replica's, as they report it."""
    from quire.cluster.core.config import EngineConfig
    from quire.cluster.core.model_info import ModelInfo

    config = EngineConfig.from_kwargs(**engine_kwargs)
    info = ModelInfo.load(config.model)
    return ServedModel.from_info(info, config.cache.block_size, num_kv_blocks, config.parallel.tensor_parallel_size)


class Router:
    """Implements EngineClient over `replicas` (handles in a stable order). Single event loop:
    every method but `model`, `stats`, `healthy` and `failure` runs on the loop that called
    `start`."""

    def __init__(self, replicas: list[ReplicaHandle], model: ServedModel, hash_seed: str, *,
                 policy: str = "cache_aware",
                 replica_factory: Callable[[str], Awaitable[ReplicaHandle]] | None = None,
                 max_queue_len: int = 0, metrics=None, poll_seconds: float = POLL_SECONDS,
                 autoscale: AutoscaleConfig | None = None, drain_grace_seconds: float = 30.0):
        self._model = model
        self.policy = make_policy(policy)
        self.hasher = BlockHasher(model.block_size, bytes.fromhex(hash_seed))
        self.counters = RouterCounters()
        self.max_queue_len, self._metrics = max_queue_len, metrics
        self.pool = ReplicaPool(replicas, on_news=self._deliver, on_dead=self._move, on_ready=self._unpark,
                                factory=replica_factory, poll_seconds=poll_seconds, metrics=metrics,
                                counters=self.counters)
        self._placements: dict[str, Placement] = {}
        self._streams: dict[str, RoutedStream] = {}
        self._parked: list[tuple[RoutedStream, list[int]]] = []  # samples waiting for a live replica
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False
        self.drain_grace_seconds = _grace(drain_grace_seconds, "drain_grace_seconds")
        self.autoscaler = Autoscaler(autoscale) if autoscale is not None else None
        self._rolling = False
        self._scaling: asyncio.Task | None = None

    @property
    def mirror(self):
        return self.pool.mirror

    @property
    def metrics(self):
        """A `RouterMetrics` the router and its pool record into (None: none)."""
        return self._metrics

    @metrics.setter
    def metrics(self, metrics) -> None:
        self._metrics = self.pool.metrics = metrics

    @property
    def replica_factory(self):
        return self.pool.factory

    @replica_factory.setter
    def replica_factory(self, factory) -> None:
        self.pool.factory = factory

    # -- EngineClient: facts and health ----------------------------------------------------
    @property
    def model(self) -> ServedModel:
        return self._model

    @property
    def failure(self) -> str | None:
        if self._stopped:
            return "the router was shut down"
        if not self.pool.any_healthy():
            return "no replica is serving"
        return None

    @property
    def healthy(self) -> bool:
        return self.failure is None

    def stats(self) -> StatsSnapshot:
        per_replica = self.pool.stats()
        serving = [s for s in per_replica if s.state == "serving"]
        kv = sum(s.kv_usage for s in serving) / len(serving) if serving else 0.0
        return StatsSnapshot(sum(s.num_running for s in serving), sum(s.num_waiting for s in serving), kv,
                             self.failure, self.max_queue_len, replicas=per_replica)

    def replica_ids(self, state: str = "serving") -> list[str]:
        return self.pool.ids(state)

    def handle(self, replica_id: str) -> ReplicaHandle:
        return self.pool.records[replica_id].handle

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start one poll loop per replica on the running event loop (idempotent)."""
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop:
            raise RuntimeError("a router serves one event loop")
        self._loop = loop
        self.pool.start()
        if self.autoscaler is not None and self._scaling is None:
            self._scaling = asyncio.ensure_future(self.autoscaler.run(self._load_sample, self.add_replica,
                                                                      self._drain_least_busy))

    def shutdown(self) -> None:
        """Stop polling, end every open stream with EngineDeadError, shut the replicas down."""
        if self._stopped:
            return
        self._stopped = True
        for stream in list(self._streams.values()):
            stream.queue.put_nowait(EngineDeadError("the router was shut down"))
        self._streams.clear()
        if self._scaling is not None:
            self._scaling.cancel()
        self.pool.shutdown(self._loop)

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
        if self.failure is not None and not self.pool.restarting:
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
        waiting = self.pool.num_waiting()
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

    # -- ReplicaAdmin ------------------------------------------------------------------------
    def list_replicas(self) -> list[ReplicaInfo]:
        infos = []
        for name, record in self.pool.records.items():
            stats = record.stats
            infos.append(ReplicaInfo(
                name=name, state=record.state, healthy=record.state == "serving" and stats.healthy,
                num_running=stats.num_running, num_waiting=stats.num_waiting,
                live_requests=record.load.live_requests, kv_usage=stats.kv_usage,
                cached_blocks=len(self.mirror.cached_hashes(name)),
                node=self.pool.node(name) if record.handle is not None else ""))
        return infos

    async def add_replica(self) -> str:
        name = await self.pool.add()
        self._record("on_scaled", "up")
        return name

    async def drain_replica(self, name: str, grace_seconds: float | None = None) -> None:
        grace = self.drain_grace_seconds if grace_seconds is None else _grace(grace_seconds, "grace_seconds")
        await self.pool.drain(name, grace)
        self._record("on_scaled", "down")

    async def remove_replica(self, name: str) -> None:
        await self.drain_replica(name, 0.0)

    async def rolling_restart(self, grace_seconds: float | None = None) -> list[str]:
        """Replace every serving replica, one at a time: a fresh one serves before the old
        one drains, so capacity never drops and no request fails. It needs room for one
        replica more than serve (on a fixed cluster at --max-replicas, none: the new replica
        waits for resources until the factory's start timeout)."""
        grace = self.drain_grace_seconds if grace_seconds is None else _grace(grace_seconds, "grace_seconds")
        if self._rolling:
            raise AdminConflictError("a rolling restart is already under way")
        self._rolling = True
        try:
            fresh = []
            for old in self.pool.ids("serving"):
                fresh.append(await self.pool.add())
                if old in self.pool.records and self.pool.records[old].state == "serving":
                    await self.pool.drain(old, grace)
            return fresh
        finally:
            self._rolling = False

    def _load_sample(self) -> tuple[int, int, int, bool]:
        """What the autoscaler decides on: serving replicas, requests in flight (placed, or
        waiting for a replica), requests the replicas report queued, whether one is changing."""
        pool = self.pool
        changing = bool(pool.ids("starting") or pool.ids("draining") or pool.restarting or self._rolling)
        load = sum(l.live_requests for l in pool.serving_loads()) + sum(len(i) for _, i in self._parked)
        waiting = pool.num_waiting()
        return len(pool.ids("serving")), load, waiting, changing

    async def _drain_least_busy(self) -> None:
        """Scale down: the replica with the fewest live requests leaves (the newest among
        equals): the least to finish or move."""
        serving = self.pool.ids("serving")
        victim = min(serving, key=lambda name: (self.pool.records[name].load.live_requests, -serving.index(name)))
        logger.info("autoscaling down: draining %s", victim)
        await self.drain_replica(victim)

    # -- placement and migration -----------------------------------------------------------
    async def _place(self, stream: RoutedStream, indexes: list[int], sub_id: str, params: SamplingParams,
                     resume: list[int] | None) -> None:
        """Choose a replica for `indexes` of the stream (tokens so far: `resume`) and send it
        there; with none live, park it until one is (or fail the stream when none can come)."""
        token_ids = stream.prompt_token_ids + (resume or [])
        loads = self.pool.serving_loads()
        if not loads:
            if self.pool.factory is not None and not self._stopped:
                self._parked.append((stream, indexes))
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
        placement = self._placements[sub_id] = Placement(sub_id, stream, decision.replica_id, indexes)
        self.pool.assign(decision.replica_id, sub_id, max(0, len(token_ids) - cached_tokens))
        request = ReplicaRequest(sub_id, stream.prompt, stream.prompt_token_ids, params, stream.cache_salt,
                                 stream.priority, resume)
        try:
            await self.pool.records[decision.replica_id].handle.add(request)
        except ReplicaDeadError as error:
            await self.pool.mark_dead(decision.replica_id, str(error))
        except Exception as error:  # noqa: BLE001 - this request could not be sent: it alone fails
            logger.exception("sending %s to replica %s failed", sub_id, decision.replica_id)
            self._unplace(placement)
            self._fail_stream(stream, RequestFailedError(f"the request could not be sent to a replica: {error!r}"))

    def _unplace(self, placement: Placement) -> bool:
        """Forget a placement; returns whether its replica still counted it."""
        self._placements.pop(placement.sub_id, None)
        return self.pool.release(placement.replica_id, placement.sub_id)

    def _release(self, stream: RoutedStream) -> None:
        """Forget a stream that ended early, aborting its live placements on their replicas."""
        self._parked = [(s, i) for s, i in self._parked if s is not stream]
        for placement in [p for p in self._placements.values() if p.stream is stream]:
            if self._unplace(placement):
                self.pool.abort(placement.replica_id, placement.sub_id)

    async def _move(self, request_ids: list[str]) -> None:
        """A replica died holding these requests: continue each one's unfinished samples
        elsewhere, one request per sample, from the tokens its client has received."""
        for request_id in request_ids:
            placement = self._placements.pop(request_id, None)
            if placement is None:
                continue
            stream = placement.stream
            if self._streams.get(stream.request_id) is not stream:
                continue
            for index in stream.unfinished(placement.indexes):
                self.counters.migrations += 1
                self._record("on_migrated")
                await self._place(stream, [index], *stream.continuation(index))

    async def _unpark(self) -> None:
        """A replica came (back) into service: place the samples that waited for one."""
        parked, self._parked = self._parked, []
        for stream, indexes in parked:
            for index in stream.unfinished(indexes):
                await self._place(stream, [index], *stream.continuation(index))

    # -- news from the replicas -----------------------------------------------------------
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
        if any(c.token_ids for c in output.outputs):
            self.pool.prefill_done(placement.replica_id, placement.sub_id)
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


def _grace(value, field: str) -> float:
    """A drain's grace period, or ValueError naming `field`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`{field}` must be a finite number of seconds >= 0 (got {value!r})")
    return float(value)
