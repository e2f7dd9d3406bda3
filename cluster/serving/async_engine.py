"""An asyncio front for the synchronous `Engine`: one background thread runs the engine loop.

The `Engine` is not thread-safe, so exactly one thread (the engine loop) ever touches it.
Callers on any asyncio loop talk to it through a command queue (add / abort) and get
each request's deltas back on an `asyncio.Queue` filled with `loop.call_soon_threadsafe`.
The loop drains commands, then steps while there is work, and sleeps on a condition
variable when there is none.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from quire.cluster.core.engine import Engine
from quire.cluster.core.outputs import CompletionOutput, RequestOutput
from quire.cluster.serving.engine_client import (
    EngineDeadError,
    QueueFullError,
    RequestFailedError,
    ServedModel,
    StatsSnapshot,
)
from quire.protos.step import SamplingParams

if TYPE_CHECKING:  # metrics need prometheus-client, which an image without the HTTP server lacks
    from quire.cluster.serving.metrics import ServerMetrics

logger = logging.getLogger(__name__)

__all__ = ["AsyncEngine", "EngineDeadError", "QueueFullError", "RequestFailedError"]

# How often an idle engine loop looks for a worker death the executor's health watch found.
WORKER_CHECK_SECONDS = 0.5


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float = 0.0  # time.monotonic() when the caller asked
    first_token: float | None = None
    prompt: str | None = None
    prompt_token_ids: list[int] = field(default_factory=list)
    num_tokens: dict[int, int] = field(default_factory=dict)    # per sample index, so far
    finished: set[int] = field(default_factory=set)             # sample indexes that have finished

    def put(self, item: RequestOutput | BaseException) -> bool:
        """Hand an item to the consumer's loop; False when that loop is gone."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
            return True
        except RuntimeError:  # the consumer's event loop is closed
            return False


class AsyncEngine:
    """Owns an `Engine`, runs it in one daemon thread, and implements `EngineClient`.

    Contracts (beyond `EngineClient`'s): a bad request raises ValueError (from
    `Engine.add_request`), and a request arriving while `max_queue_len` (> 0) requests wait
    raises QueueFullError, both before any output; if a step raises (a failure that belongs
    to no request), every in-flight stream raises `EngineDeadError`, `healthy` turns False
    for good, `failure` says why and `on_dead` is called once (from the loop thread), so a
    server can exit for its supervisor to restart it. With `metrics`, the loop thread
    records every request's tokens and latencies there; `on_step(engine)` runs on the loop
    thread after every round of commands and step (a replica host drains KV events there).
    """

    def __init__(self, engine: Engine, max_queue_len: int = 0, metrics: ServerMetrics | None = None,
                 on_dead: Callable[[BaseException], None] | None = None,
                 on_step: Callable[[Engine], None] | None = None):
        if max_queue_len < 0:
            raise ValueError(f"`max_queue_len` must be >= 0 (0: no limit), got {max_queue_len}")
        self.engine = engine
        self.max_queue_len = max_queue_len
        self.metrics = metrics
        self.on_dead = on_dead
        self.on_step = on_step  # called on the loop thread after every round of commands and step
        self._cond = threading.Condition()
        self._commands: deque[tuple] = deque()
        self._streams: dict[str, _Stream] = {}  # owned by the engine loop thread
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self._error: BaseException | None = None
        self._pausing = False
        info = engine.info
        self._model = ServedModel.from_info(info, engine.block_size, engine.kv.pool.num_blocks,
                                            engine.executor.world_size)
        # Published by the loop thread after every step, so readers never touch the engine.
        self._load = (0, 0, 0.0)  # running, waiting, KV usage

    @property
    def model(self) -> ServedModel:
        return self._model

    @property
    def healthy(self) -> bool:
        # A worker found dead by the executor's health thread makes the engine unhealthy
        # even before the next step fails on it.
        return self.failure is None

    @property
    def error(self) -> BaseException | None:
        """The failure that stopped the engine for good (None while it may serve: a worker
        being replaced, or a paused loop, is no such failure)."""
        return self._error

    @property
    def failure(self) -> str | None:
        """Why the engine is not serving (None while it is healthy)."""
        if self._error is not None:
            return f"the engine stopped: {self._error!r}"
        worker_failure = getattr(self.engine.executor, "failure", None)
        if worker_failure is not None:
            return f"a worker is down: {worker_failure}"
        if self._stopping or self._pausing or self._thread is None or not self._thread.is_alive():
            return "the engine is not running"
        return None

    def stats(self) -> StatsSnapshot:
        running, waiting, kv_usage = self._load
        return StatsSnapshot(running, waiting, kv_usage, self.failure, self.max_queue_len)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine loop thread, or resume it after `pause` (idempotent)."""
        if self._thread is not None and self._pausing:
            self._thread.join()
        with self._cond:
            if self._stopping:
                return
            self._pausing = False
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="quire-engine-loop", daemon=True)
                self._thread.start()

    def pause(self, timeout: float | None = None) -> None:
        """Let the loop thread end once the engine has nothing left to do (every request
        finished or aborted, no step in flight), keeping the engine open; `start` resumes.
        For a caller, such as `LLM`, that wants no thread touching the engine between calls.
        Requests still live when it is called run to their end first."""
        with self._cond:
            self._pausing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop, end every open stream with EngineDeadError, release the engine."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        if (self._thread is None or not self._thread.is_alive()) and not self._closed:
            self._closed = True
            self._fail_all(EngineDeadError("the engine was shut down"))
            self.engine.shutdown()

    # -- client API (any thread / event loop) ----------------------------------------------
    def abort(self, request_id: str) -> None:
        """Abort a request; its stream ends with a finish_reason "abort" output."""
        self._submit(("abort", request_id, True))

    def is_live(self, request_id: str) -> bool:
        """Whether the request was admitted and has not finished (a snapshot: it may finish
        or be admitted right after)."""
        return request_id in self._streams

    async def call(self, function: Callable[[Engine], object]) -> object:
        """Run `function(engine)` on the engine loop thread between two steps and return its
        result (or raise its exception): the one safe way to read the engine's state while the
        loop runs (a KV snapshot, an integrity check). Needs the loop running."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._submit(("call", None, function, loop, future))
        return await future

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None, *,
                       cache_salt: str | None = None, priority: int = 0,
                       resume_token_ids: list[int] | None = None) -> AsyncIterator[RequestOutput]:
        """Queue a request and yield its deltas (ValueError first if the engine rejects it).
        Closing or cancelling the iteration before the finished output aborts the request.
        `cache_salt`, `priority` and `resume_token_ids` (a migrated stream's tokens so far)
        are `Engine.add_request`'s."""
        # A loop that is paused (or not started yet) queues the request until `start`; a failed
        # or stopped engine, or one with a dead worker, refuses it.
        if self._error is not None or self._stopping or getattr(self.engine.executor, "failure", None) is not None:
            raise EngineDeadError(f"the engine is not running ({self.failure})") from self._error
        request_id = request_id or uuid.uuid4().hex
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), arrival=time.monotonic())
        self._submit(("add", request_id, prompt, params, stream, cache_salt, priority, resume_token_ids))
        done = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                done = item.finished
                if item.error is not None:
                    raise RequestFailedError(item.error)
                yield item
                if done:
                    return
        finally:
            if not done:  # consumer went away (closed, cancelled): free the request's blocks
                self._submit(("abort", request_id, False))

    def _submit(self, command: tuple) -> None:
        with self._cond:
            if self._stopping:  # the loop has drained its last commands or is about to
                _refuse(command)
                return
            self._commands.append(command)
            self._cond.notify()

    # -- engine loop (the only thread that touches self.engine) ----------------------------
    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                # After a failure the engine's state is suspect: never step it again.
                while not (self._commands or self._stopping or (self._error is None and engine.has_unfinished())
                           or self._worker_died() or self._pausing):
                    self._cond.wait(WORKER_CHECK_SECONDS)
                commands, self._commands = self._commands, deque()
                if self._stopping:
                    break
                if self._pausing and not commands and (self._error is not None or not engine.has_unfinished()):
                    return
            try:
                if self._worker_died():
                    engine.check_workers()  # restarts the workers while idle too (or raises)
                for command in commands:
                    self._handle(command)
                if self._error is None and engine.has_unfinished():
                    self._dispatch(engine.step())
            except Exception as exc:
                logger.exception("engine loop failed; failing %d requests", len(self._streams))
                self._error = exc
                if self.on_dead is not None:  # before the streams learn of it: callers see a settled state
                    self.on_dead(exc)
                self._fail_all(EngineDeadError(f"engine step failed: {exc!r}"))
            self._publish()
        for command in commands:  # queued before shutdown: tell the callers instead of hanging them
            _refuse(command)

    def _worker_died(self) -> bool:
        return (self._error is None and self.engine.failure is None
                and getattr(self.engine.executor, "failure", None) is not None)

    def _handle(self, command: tuple) -> None:
        kind, request_id = command[0], command[1]
        if kind == "call":
            _, _, function, loop, future = command
            try:
                result, error = function(self.engine), None
            except Exception as exc:  # noqa: BLE001 - the caller's to handle
                result, error = None, exc
            _settle(loop, future, result, error)
        elif kind == "add":
            _, _, prompt, params, stream, cache_salt, priority, resume_token_ids = command
            if self._error is not None:
                stream.put(self._dead(f"the engine failed earlier: {self._error!r}"))
                return
            waiting = len(self.engine.scheduler.waiting)
            if self.max_queue_len and waiting >= self.max_queue_len:
                self._record_rejection("queue_full")
                stream.put(QueueFullError(f"{waiting} requests are waiting (max_queue_len={self.max_queue_len}); "
                                          "retry later"))
                return
            try:
                self.engine.add_request(prompt, params, request_id=request_id, priority=priority,
                                        cache_salt=cache_salt, resume_token_ids=resume_token_ids)
            except ValueError as exc:
                self._record_rejection("invalid")
                stream.put(ValueError(str(exc)))  # a fresh instance: this traceback belongs to the loop
                return
            except Exception as exc:
                logger.exception("add_request(%s) failed", request_id)
                stream.put(RuntimeError(f"could not add the request: {exc!r}"))
                return
            request = self.engine.scheduler.requests[self.engine.parents[request_id].sample_ids[0]]
            stream.prompt, stream.prompt_token_ids = request.prompt, request.prompt_token_ids
            stream.num_tokens = dict.fromkeys(range(params.n), 0)
            self._streams[request_id] = stream
            if self.metrics is not None:
                self.metrics.on_admitted(len(request.prompt_token_ids))
        elif kind == "abort":
            notify = command[2]
            stream = self._streams.pop(request_id, None)
            if self._error is None:
                self.engine.abort(request_id)
            if stream is None:
                return
            running = [index for index in stream.num_tokens if index not in stream.finished]
            for index in running:
                self._record_finish(stream, "abort", stream.num_tokens[index])
            if notify:
                final = [CompletionOutput(index=index, text="", token_ids=[], finish_reason="abort")
                         for index in running]
                stream.put(RequestOutput(request_id, stream.prompt, stream.prompt_token_ids, final, True))

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """Hand each request's delta to its stream (deltas are fresh objects: no copy needed)."""
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            new_tokens = 0
            for completion in output.outputs:
                new_tokens += len(completion.token_ids)
                stream.num_tokens[completion.index] += len(completion.token_ids)
                if completion.finish_reason is not None:
                    stream.finished.add(completion.index)
                    self._record_finish(stream, completion.finish_reason, stream.num_tokens[completion.index])
            if stream.first_token is None and new_tokens:
                stream.first_token = time.monotonic()
                if self.metrics is not None:
                    self.metrics.on_first_token(stream.first_token - stream.arrival)
            if self.metrics is not None:
                self.metrics.on_tokens(new_tokens)
            if output.finished:
                del self._streams[output.request_id]
            if not stream.put(output) and not output.finished:  # the consumer's loop is gone
                self._streams.pop(output.request_id, None)
                self.engine.abort(output.request_id)
                for index in stream.num_tokens:
                    if index not in stream.finished:
                        self._record_finish(stream, "abort", stream.num_tokens[index])

    def _record_rejection(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.on_rejected(reason)

    def _record_finish(self, stream: _Stream, finish_reason: str, num_output_tokens: int) -> None:
        if self.metrics is not None:
            now = time.monotonic()
            self.metrics.on_finished(finish_reason, num_output_tokens, now - stream.arrival,
                                     None if stream.first_token is None else stream.first_token - stream.arrival)

    def _dead(self, message: str) -> EngineDeadError:
        """An EngineDeadError whose `__cause__` is the engine's own failure (None after a shutdown)."""
        error = EngineDeadError(message)
        error.__cause__ = self._error
        return error

    def _fail_all(self, error: BaseException) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.put(self._dead(str(error)))

    def _publish(self) -> None:
        if self.on_step is not None:
            self.on_step(self.engine)
        scheduler = self.engine.scheduler
        self._load = running, waiting, kv_usage = len(scheduler.running), len(scheduler.waiting), self.engine.kv_usage
        if self.metrics is not None:
            kv = self.engine.kv
            self.metrics.publish_load(running, waiting, kv_usage, scheduler.num_preemptions,
                                      kv.num_query_tokens, kv.num_hit_tokens, self.engine.num_worker_restarts,
                                      kv.num_host_hit_tokens, kv.num_offloaded_blocks)


def _settle(loop: asyncio.AbstractEventLoop, future: asyncio.Future, result, error: BaseException | None) -> None:
    """Resolve a caller's future from the loop thread (nothing to do once its loop is closed)."""
    def resolve():
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    try:
        loop.call_soon_threadsafe(resolve)
    except RuntimeError:
        pass


def _refuse(command: tuple) -> None:
    """Answer a command the stopped loop will never run, instead of leaving its caller hanging."""
    if command[0] == "add":
        command[4].put(EngineDeadError("the engine was shut down"))
    elif command[0] == "call":
        _settle(command[3], command[4], None, EngineDeadError("the engine was shut down"))
