"""The `n` output streams behind one OpenAI-style HTTP request, and the client's connection.

`ChoiceStreams` owns the engine generators of one request's samples: it waits for their
first outputs (where refusals surface), then either collects them or merges them into
one server-sent-event stream. Whatever way it ends (finished, refused, a disconnect, a
dead engine), every unfinished sample is aborted, so no KV block outlives its client.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from quire.cluster.serving.async_engine import EngineDeadError, RequestFailedError, interleave
from quire.cluster.core.outputs import CompletionOutput, RequestOutput


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


# render(choice index, its newest output, logprobs of its new tokens) → an SSE payload, or None to skip
RenderChunk = Callable[[int, CompletionOutput, list], "dict | None"]


class ChoiceStreams:
    def __init__(self, generators: list[AsyncIterator[RequestOutput]], raw: Request):
        self.generators, self.raw = generators, raw
        self.latest: list[RequestOutput | None] = [None] * len(generators)
        self._watcher: asyncio.Future | None = None

    async def first_outputs(self) -> None:
        """Wait for every sample's first output. Raises what the engine refused them with
        (ValueError, QueueFullError, EngineDeadError, RequestFailedError) or ClientGone,
        ending all samples."""
        self._watcher = asyncio.ensure_future(_until_disconnect(self.raw))
        try:
            for index, generator in enumerate(self.generators):
                self.latest[index] = await _unless_disconnected(generator.__anext__(), self._watcher)
        except BaseException:
            await self.close()
            raise

    async def collect(self) -> list[RequestOutput]:
        """Every sample's finished output (raises ClientGone, EngineDeadError or
        RequestFailedError, ending all)."""
        try:
            for index, generator in enumerate(self.generators):
                while not self.latest[index].finished:
                    self.latest[index] = await _unless_disconnected(generator.__anext__(), self._watcher)
            return list(self.latest)
        finally:
            await self.close()

    def usage(self) -> dict:
        prompt = len(self.latest[0].prompt_token_ids)
        completion = sum(len(output.outputs[0].token_ids) for output in self.latest)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def sse(self, render: RenderChunk, usage_head: dict | None) -> AsyncIterator[str]:
        """The SSE body: chunks as `render` shapes them, a usage chunk (`usage_head` plus
        `choices: []` and `usage`) when asked for, then `[DONE]`. Closing it (the client left)
        aborts every unfinished sample."""
        if self._watcher is not None:
            self._watcher.cancel()  # Starlette watches the connection of a streaming response itself
        try:
            async for index, output in interleave(self.generators, list(self.latest)):
                self.latest[index] = output
                completion = output.outputs[0]
                new = len(completion.delta_token_ids)
                payload = render(index, completion, (completion.logprobs or [])[-new:] if new else [])
                if payload is not None:
                    yield sse({**payload, "usage": None} if usage_head is not None else payload)
            if usage_head is not None:
                yield sse({**usage_head, "choices": [], "usage": self.usage()})
        except (EngineDeadError, RequestFailedError) as exc:  # after the 200 went out: an error event
            yield sse({"error": {"message": str(exc), "type": "internal_server_error", "param": None, "code": 500}})
        finally:
            await self.close()
        yield sse("[DONE]")

    async def close(self) -> None:
        """End every sample: a no-op for finished ones, an abort for the others."""
        if self._watcher is not None:
            self._watcher.cancel()
        for generator in self.generators:
            await generator.aclose()
