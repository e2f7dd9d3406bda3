"""One OpenAI-style HTTP request's engine stream, and the client's connection.

`ResponseStream` owns the engine stream of one request (all `n` samples): it waits for
its first output (where refusals surface), then either collects it whole or turns it into
a server-sent-event stream, one chunk per sample's delta. Whatever way it ends (finished,
refused, a disconnect, a dead engine), the request is aborted unless it finished, so no KV
block outlives its client.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from quire.cluster.core.outputs import CompletionOutput, OutputAccumulator, RequestOutput
from quire.cluster.serving.engine_client import EngineDeadError, RequestFailedError


class ClientGone(Exception):
    """The HTTP client disconnected before its response started."""


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _until_disconnect(raw: Request) -> None:
    # Once the body is read, the server's receive() only returns to report a disconnect.
    while (await raw.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(awaitable, watcher: asyncio.Future):
    """Await `awaitable`; if `watcher` (the client's disconnect) finishes first, cancel it and
    raise ClientGone."""
    task = asyncio.ensure_future(awaitable)
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # let it unwind (and abort its request) before going on
    if task.cancelled():
        raise ClientGone
    return task.result()


# render(a sample's delta) → an SSE payload, or None to skip
RenderChunk = Callable[[CompletionOutput], "dict | None"]


class ResponseStream:
    def __init__(self, stream: AsyncIterator[RequestOutput], raw: Request):
        self.stream, self.raw = stream, raw
        self.num_output_tokens = 0  # over all samples, so far
        self._first: RequestOutput | None = None
        self._watcher: asyncio.Future | None = None

    async def first_output(self) -> None:
        """Wait for the request's first output. Raises what the engine refused it with
        (ValueError, QueueFullError, EngineDeadError, RequestFailedError) or ClientGone,
        ending the request."""
        self._watcher = asyncio.ensure_future(_until_disconnect(self.raw))
        try:
            self._first = await _unless_disconnected(self.stream.__anext__(), self._watcher)
        except BaseException:
            await self.close()
            raise

    async def collect(self) -> RequestOutput:
        """The whole request, samples in index order (raises ClientGone, EngineDeadError or
        RequestFailedError, ending it)."""
        try:
            output, received = self._first, OutputAccumulator()
            received.add(output)
            while not output.finished:
                output = await _unless_disconnected(self.stream.__anext__(), self._watcher)
                received.add(output)
            whole = received.result()
            self.num_output_tokens = sum(len(completion.token_ids) for completion in whole.outputs)
            return whole
        finally:
            await self.close()

    def usage(self) -> dict:
        prompt, completion = len(self._first.prompt_token_ids), self.num_output_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def sse(self, render: RenderChunk, usage_head: dict | None) -> AsyncIterator[str]:
        """The SSE body: chunks as `render` shapes them, a usage chunk (`usage_head` plus
        `choices: []` and `usage`) when asked for, then `[DONE]`. Closing it (the client left)
        aborts the request."""
        if self._watcher is not None:
            self._watcher.cancel()  # Starlette watches the connection of a streaming response itself
        try:
            output = self._first
            while True:
                for completion in output.outputs:
                    self.num_output_tokens += len(completion.token_ids)
                    payload = render(completion)
                    if payload is not None:
                        yield sse({**payload, "usage": None} if usage_head is not None else payload)
                if output.finished:
                    break
                output = await self.stream.__anext__()
            if usage_head is not None:
                yield sse({**usage_head, "choices": [], "usage": self.usage()})
        except (EngineDeadError, RequestFailedError) as exc:  # after the 200 went out: an error event
            yield sse({"error": {"message": str(exc), "type": "internal_server_error", "param": None, "code": 500}})
        finally:
            await self.close()
        yield sse("[DONE]")

    async def close(self) -> None:
        """End the request: a no-op once it finished, an abort before."""
        if self._watcher is not None:
            self._watcher.cancel()
        await self.stream.aclose()
