"""An asyncio front for the synchronous `Engine`: one background thread runs the engine loop.

The `Engine` is not thread-safe, so exactly one thread (the engine loop) ever touches it.
Callers on any asyncio loop talk to it through a command queue (add / abort) and get
each request's outputs back on an `asyncio.Queue` filled with `loop.call_soon_threadsafe`.
The loop drains commands, then steps while there is work, and sleeps on a condition
variable when there is none.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from quire.cluster.core.engine import Engine
from quire.cluster.serving.metrics import ServerMetrics
from quire.cluster.core.outputs import CompletionOutput, RequestOutput
from quire.protos.step import SamplingParams

logger = logging.getLogger(__name__)


async def interleave(streams: list[AsyncIterator[RequestOutput]],
                     firsts: list[RequestOutput]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(index, output) of several requests' output streams as the outputs come, each
    stream's in order: first `firsts` (each stream's first output, already taken), then the
    rest of every unfinished stream. Closing it cancels the reads in progress; the streams
    themselves are the caller's to close."""
    for index, output in enumerate(firsts):
        yield index, output
    pending = {asyncio.ensure_future(streams[i].__anext__()): i for i, output in enumerate(firsts) if not output.finished}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                index = pending.pop(task)
                output = task.result()
                yield index, output
                if not output.finished:
                    pending[asyncio.ensure_future(streams[index].__anext__())] = index
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)


# How often an idle engine loop looks for a worker death the executor's health watch found.
WORKER_CHECK_SECONDS = 0.5


class EngineDeadError(RuntimeError):
    """The engine loop failed or was shut down; the request cannot complete."""


class QueueFullError(RuntimeError):
    """The queue of waiting requests is at `max_queue_len`: try again later."""


class RequestFailedError(RuntimeError):
    """The request failed on its own inside a step (the engine serves the others on)."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float = 0.0  # time.monotonic() when the caller asked
    first_token: float | None = None
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    last: CompletionOutput | None = None

    def put(self, item: RequestOutput | BaseException) -> bool:
        """Hand an item to the consumer's loop; False when that loop is gone."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
            return True
        except RuntimeError:  # the consumer's event loop is closed
            return False


class AsyncEngine:
    """Owns an `Engine` and runs it in one daemon thread.

    Contracts: `generate` yields every output of its request in order and ends after the
    finished one; a bad request raises ValueError (from `Engine.add_request`), and a request
    arriving while `max_queue_len` (> 0) requests wait raises QueueFullError, both before any
    output; a request that fails on its own in a step raises RequestFailedError and nobody
    else notices; a consumer that stops iterating aborts its request, freeing its KV blocks;
    if a step raises (a failure that belongs to no request), every in-flight stream raises
    `EngineDeadError`, `healthy` turns False for good, `failure` says why and `on_dead` is
    called once (from the loop thread), so a server can exit for its supervisor to restart it.
    With `metrics`, the loop thread records every request's tokens and latencies there.
    """

    def __init__(self, engine: Engine, max_queue_len: int = 0, metrics: ServerMetrics | None = None,
                 on_dead: Callable[[BaseException], None] | None = None):
        if max_queue_len < 0:
            raise ValueError(f"`max_queue_len` must be >= 0 (0: no limit), got {max_queue_len}")
        self.engine = engine
        self.max_queue_len = max_queue_len
        self.metrics = metrics
        self.on_dead = on_dead
        self._cond = threading.Condition()
        self._commands: deque[tuple] = deque()
        self._streams: dict[str, _Stream] = {}  # owned by the engine loop thread
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self._error: BaseException | None = None
        # Snapshots published by the loop thread, so readers never touch the engine.
        self.num_running = 0
        self.num_waiting = 0
        self.kv_usage = 0.0

    @property
    def healthy(self) -> bool:
        # A worker found dead by the executor's health thread makes the engine unhealthy
        # even before the next step fails on it.
        return self.failure is None

    @property
    def failure(self) -> str | None:
        """Why the engine is not serving (None while it is healthy)."""
        if self._error is not None:
            return f"the engine stopped: {self._error!r}"
        worker_failure = getattr(self.engine.executor, "failure", None)
        if worker_failure is not None:
            return f"a worker is down: {worker_failure}"
        if self._stopping or self._thread is None or not self._thread.is_alive():
            return "the engine is not running"
        return None

    @property
    def model_name(self) -> str:
        return self.engine.info.name

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine loop thread (idempotent)."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="quire-engine-loop", daemon=True)
                self._thread.start()

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

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                       cache_salt: str | None = None, fork_of: str | None = None) -> AsyncIterator[RequestOutput]:
        """Queue a request and yield its outputs (ValueError first if the engine rejects it).
        Closing or cancelling the iteration before the finished output aborts the request.
        `cache_salt` and `fork_of` are `Engine.add_request`'s."""
        if not self.healthy:
            raise EngineDeadError(f"the engine is not running ({self._error or 'stopped'})")
        request_id = request_id or uuid.uuid4().hex
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), arrival=time.monotonic())
        self._submit(("add", request_id, prompt, params, stream, cache_salt, fork_of))
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
                if command[0] == "add":
                    command[4].put(EngineDeadError("the engine was shut down"))
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
                           or self._worker_died()):
                    self._cond.wait(WORKER_CHECK_SECONDS)
                commands, self._commands = self._commands, deque()
                if self._stopping:
                    break
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
            if command[0] == "add":
                command[4].put(EngineDeadError("the engine was shut down"))

    def _worker_died(self) -> bool:
        return (self._error is None and self.engine.failure is None
                and getattr(self.engine.executor, "failure", None) is not None)

    def _handle(self, command: tuple) -> None:
        kind, request_id = command[0], command[1]
        if kind == "add":
            _, _, prompt, params, stream, cache_salt, fork_of = command
            if self._error is not None:
                stream.put(EngineDeadError(f"the engine failed earlier: {self._error!r}"))
                return
            waiting = len(self.engine.scheduler.waiting)
            if self.max_queue_len and waiting >= self.max_queue_len:
                self._record_rejection("queue_full")
                stream.put(QueueFullError(f"{waiting} requests are waiting (max_queue_len={self.max_queue_len}); "
                                          "retry later"))
                return
            try:
                self.engine.add_request(prompt, params, request_id=request_id, cache_salt=cache_salt, fork_of=fork_of)
            except ValueError as exc:
                self._record_rejection("invalid")
                stream.put(ValueError(str(exc)))  # a fresh instance: this traceback belongs to the loop
                return
            except Exception as exc:
                logger.exception("add_request(%s) failed", request_id)
                stream.put(RuntimeError(f"could not add the request: {exc!r}"))
                return
            request = self.engine.scheduler.requests[request_id]
            stream.prompt, stream.prompt_token_ids = request.prompt, list(request.prompt_token_ids)
            self._streams[request_id] = stream
            if self.metrics is not None:
                self.metrics.on_admitted(len(request.prompt_token_ids))
        elif kind == "abort":
            notify = command[2]
            stream = self._streams.pop(request_id, None)
            if self._error is None:
                self.engine.abort(request_id)
            if stream is not None:
                self._record_finish(stream, "abort", len(stream.last.token_ids) if stream.last else 0)
            if stream is not None and notify:
                last = stream.last or CompletionOutput(index=0, text="", token_ids=[])
                final = dataclasses.replace(last, finish_reason="abort", delta_text="", delta_token_ids=[])
                stream.put(RequestOutput(request_id, stream.prompt, stream.prompt_token_ids, [final], True))

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            # Engine outputs alias the request's live lists; snapshot them before another
            # thread reads them while this one keeps appending.
            completion = output.outputs[0]
            completion = dataclasses.replace(
                completion, token_ids=list(completion.token_ids),
                logprobs=None if completion.logprobs is None else list(completion.logprobs))
            output = dataclasses.replace(output, outputs=[completion])
            stream.last = completion
            if stream.first_token is None and completion.token_ids:
                stream.first_token = time.monotonic()
                if self.metrics is not None:
                    self.metrics.on_first_token(stream.first_token - stream.arrival)
            if self.metrics is not None:
                self.metrics.on_tokens(len(completion.delta_token_ids))
            if output.finished:
                del self._streams[output.request_id]
                self._record_finish(stream, completion.finish_reason or "stop", len(completion.token_ids))
            if not stream.put(output) and not output.finished:  # the consumer's loop is gone
                self._streams.pop(output.request_id, None)
                self.engine.abort(output.request_id)
                self._record_finish(stream, "abort", len(completion.token_ids))

    def _record_rejection(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.on_rejected(reason)

    def _record_finish(self, stream: _Stream, finish_reason: str, num_output_tokens: int) -> None:
        if self.metrics is not None:
            now = time.monotonic()
            self.metrics.on_finished(finish_reason, num_output_tokens, now - stream.arrival,
                                     None if stream.first_token is None else stream.first_token - stream.arrival)

    def _fail_all(self, error: BaseException) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.put(EngineDeadError(str(error)))

    def _publish(self) -> None:
        scheduler = self.engine.scheduler
        self.num_running, self.num_waiting = len(scheduler.running), len(scheduler.waiting)
        self.kv_usage = self.engine.kv_usage
        if self.metrics is not None:
            kv = self.engine.kv
            self.metrics.publish_load(self.num_running, self.num_waiting, self.kv_usage, scheduler.num_preemptions,
                                      kv.num_query_tokens, kv.num_hit_tokens, self.engine.num_worker_restarts)
