"""OpenAI-compatible HTTP frontend (`/v1/completions`, `/v1/models`, `/health`) over an `AsyncEngine`.

Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: an unknown
model is a 404, any invalid request (malformed JSON, a wrong type, a value the engine
rejects) a 400 whose message and `param` name the field. A bad request never affects
the others: it is rejected before it reaches the engine, or by `Engine.add_request`,
which queues nothing when it raises.
"""
from __future__ import annotations

import asyncio
import json
import math
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, StrictInt
from starlette.exceptions import HTTPException as StarletteHTTPException

from quire.cluster.async_engine import AsyncEngine, EngineDeadError
from quire.cluster.outputs import RequestOutput
from quire.protos.step import SamplingParams

# A prompt is a string or a list of token ids, or (OpenAI's batch form) a list of them.
PromptType = Union[str, list[StrictInt], list[str], list[list[StrictInt]]]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The body of `POST /v1/completions`. Unknown fields are rejected, as OpenAI does, so a
    misspelt parameter is an error rather than silently ignored."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None  # None → the served model
    prompt: PromptType
    max_tokens: StrictInt | None = 16
    temperature: float | None = None
    top_p: float | None = None
    top_k: StrictInt | None = None
    min_p: float | None = None
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: bool = False
    logprobs: StrictInt | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    n: StrictInt = 1
    best_of: StrictInt | None = None
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted and ignored

    def sampling_params(self) -> SamplingParams:
        """Engine parameters; ValueError naming the field when a value is out of range."""
        given = {name: getattr(self, name) for name in (
            "temperature", "top_p", "top_k", "min_p", "seed", "logprobs", "presence_penalty",
            "frequency_penalty", "repetition_penalty") if getattr(self, name) is not None}
        return SamplingParams(
            max_tokens=16 if self.max_tokens is None else self.max_tokens, stop=self.stop or [],
            stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens, **given)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code


def _error_response(status: int, message: str, param: str | None = None,
                    type: str = "invalid_request_error", code: str | int | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status)


def _param_of(message: str) -> str | None:
    """The engine names the offending field in backticks (e.g. "`max_tokens` must be ...")."""
    match = re.search(r"`(\w+)`", message)
    return match.group(1) if match else None


def _single_prompt(prompt: Any) -> str | list[int]:
    """Unwrap OpenAI's list-of-one batch form; batches of several prompts are refused."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, f"`prompt`: batches of several prompts ({len(prompt)}) are not supported; "
                                "send one prompt per request", "prompt")
        return prompt[0]
    return prompt


def _finite(value: float | None) -> float | None:
    # JSON has no -inf/NaN; OpenAI-compatible servers report -9999.0 for impossible tokens.
    return value if value is None or math.isfinite(value) else -9999.0


class _LogprobsBuilder:
    """OpenAI legacy completion logprobs (tokens, token_logprobs, top_logprobs, text_offset);
    offsets count characters of the completion text, continuing across stream chunks."""

    def __init__(self, tokenizer):
        self.tokenizer, self.offset = tokenizer, 0

    def build(self, token_ids: list[int], logprobs: list[dict[int, float]]) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, candidates in zip(token_ids, logprobs):
            text = self.tokenizer.decode([token_id])
            out["tokens"].append(text)
            out["token_logprobs"].append(_finite(candidates.get(token_id)))
            top: dict[str, float] = {}
            for candidate, logprob in candidates.items():
                top.setdefault(self.tokenizer.decode([candidate]), _finite(logprob))
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out


def _usage(output: RequestOutput) -> dict:
    prompt, completion = len(output.prompt_token_ids), len(output.outputs[0].token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _until_disconnect(raw: Request) -> None:
    # Once the body is read, the server's receive() only returns to report a disconnect.
    while (await raw.receive())["type"] != "http.disconnect":
        pass


class _ClientGone(Exception):
    pass


async def _unless_disconnected(awaitable, watcher: asyncio.Future):
    """Await `awaitable`; if `watcher` (the client's disconnect) finishes first, cancel it and
    raise _ClientGone."""
    task = asyncio.ensure_future(awaitable)
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # let it unwind (and abort its request) before going on
    if task.cancelled():
        raise _ClientGone
    return task.result()


def build_app(engine: AsyncEngine) -> FastAPI:
    """The HTTP app. It starts the engine loop on startup if needed; the caller owns shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield

    app = FastAPI(title="quire", lifespan=lifespan)
    app.state.engine = engine
    tokenizer = engine.engine.tokenizer

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        return _error_response(exc.status, exc.message, exc.param, exc.type, exc.code)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
        loc = [p for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return _error_response(400, f"Invalid JSON body: {first.get('ctx', {}).get('error', first['msg'])}")
        if not loc:
            return _error_response(400, f"Invalid request body: {first['msg']}")
        field = str(loc[0])
        same = [e for e in errors if [p for p in e.get("loc", ()) if p != "body"][:1] == [loc[0]]]
        if len(same) > 1:  # a union (e.g. `prompt`): one error per alternative type
            reasons = "; ".join(dict.fromkeys(e["msg"] for e in same))
            message = f"`{field}` has an invalid type or value ({reasons})"
        else:
            where = ".".join(str(p) for p in loc)
            shown = "input" in first and first["type"] not in ("extra_forbidden", "missing")
            message = f"`{where}`: {first['msg']}" + (f" (got {first['input']!r})" if shown else "")
        return _error_response(400, message, field)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        return _error_response(exc.status_code, str(exc.detail), code=exc.status_code)

    @app.exception_handler(Exception)
    async def on_unexpected_error(request: Request, exc: Exception):
        return _error_response(500, f"internal error: {exc!r}", type="internal_server_error", code=500)

    @app.get("/health")
    async def health():
        state = {"num_running": engine.num_running, "num_waiting": engine.num_waiting, "kv_usage": engine.kv_usage}
        if engine.healthy:
            return {"status": "ok", **state}
        return JSONResponse({"status": "unhealthy", **state}, 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": engine.model_name, "object": "model", "created": int(time.time()), "owned_by": "quire",
            "max_model_len": engine.engine.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        if body.model is not None and body.model != engine.model_name:
            raise APIError(404, f"The model `{body.model}` does not exist; this server serves "
                                f"`{engine.model_name}`", "model", code="model_not_found")
        if body.n != 1:
            raise APIError(400, f"`n`={body.n}: only n=1 is supported; n > 1 is not yet supported", "n")
        if body.best_of not in (None, 1):
            raise APIError(400, "`best_of` > 1 is not yet supported", "best_of")
        if body.echo:
            raise APIError(400, "`echo`=true is not supported", "echo")
        if body.suffix:
            raise APIError(400, "`suffix` is not supported", "suffix")
        if body.logit_bias:
            raise APIError(400, "`logit_bias` is not supported", "logit_bias")
        prompt = _single_prompt(body.prompt)
        try:
            params = body.sampling_params()
        except ValueError as exc:
            raise APIError(400, str(exc), _param_of(str(exc))) from None
        if not engine.healthy:
            raise APIError(503, "the engine is not running", type="service_unavailable")

        request_id = f"cmpl-{uuid.uuid4().hex}"
        outputs = engine.generate(prompt, params, request_id)
        # Until a streaming response starts, nothing else notices a client that leaves (e.g. one
        # that times out while its request waits in the queue): watch for that ourselves.
        watcher = asyncio.ensure_future(_until_disconnect(raw))
        try:
            try:
                # The first output proves the request was admitted: validation errors surface
                # here, before any response (streaming or not) has started.
                first = await _unless_disconnected(outputs.__anext__(), watcher)
            except ValueError as exc:
                raise APIError(400, str(exc), _param_of(str(exc))) from None
            except EngineDeadError as exc:
                raise APIError(503, str(exc), type="service_unavailable") from None
            created = int(time.time())
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                return StreamingResponse(  # from here on Starlette cancels the body iterator on disconnect
                    _stream(first, outputs, request_id, created, engine.model_name, tokenizer, params,
                            include_usage), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

            async def collect() -> RequestOutput:
                output = first
                async for output in outputs:
                    pass
                return output

            try:
                final = await _unless_disconnected(collect(), watcher)
            except EngineDeadError as exc:
                raise APIError(500, str(exc), type="internal_server_error") from None
        except _ClientGone:
            await outputs.aclose()  # aborts the request unless it already finished
            return Response(status_code=499)  # nobody reads this
        finally:
            watcher.cancel()
        completion = final.outputs[0]
        logprobs = None
        if params.logprobs is not None:
            logprobs = _LogprobsBuilder(tokenizer).build(completion.token_ids, completion.logprobs or [])
        return {
            "id": request_id, "object": "text_completion", "created": created, "model": engine.model_name,
            "choices": [{"index": 0, "text": completion.text, "logprobs": logprobs,
                         "finish_reason": completion.finish_reason}],
            "usage": _usage(final)}

    return app


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _stream(first: RequestOutput, outputs: AsyncIterator[RequestOutput], request_id: str, created: int,
                  model: str, tokenizer, params: SamplingParams, include_usage: bool) -> AsyncIterator[str]:
    """SSE body: a chunk per text delta, the last carrying finish_reason, an optional usage
    chunk, then `[DONE]`. Closing this iterator (client disconnect) aborts the request."""
    builder = _LogprobsBuilder(tokenizer) if params.logprobs is not None else None
    extra = {"usage": None} if include_usage else {}
    try:
        output = first
        while True:
            completion = output.outputs[0]
            if completion.delta_text or output.finished or builder is not None:
                logprobs = None
                if builder is not None:
                    new = len(completion.delta_token_ids)
                    logprobs = builder.build(completion.delta_token_ids, (completion.logprobs or [])[-new:] if new else [])
                yield _sse({"id": request_id, "object": "text_completion", "created": created, "model": model,
                            "choices": [{"index": 0, "text": completion.delta_text, "logprobs": logprobs,
                                         "finish_reason": completion.finish_reason}], **extra})
            if output.finished:
                break
            output = await outputs.__anext__()
        if include_usage:
            yield _sse({"id": request_id, "object": "text_completion", "created": created, "model": model,
                        "choices": [], "usage": _usage(output)})
    except EngineDeadError as exc:
        yield _sse({"error": {"message": str(exc), "type": "internal_server_error", "param": None, "code": 500}})
    finally:
        await outputs.aclose()  # no-op when finished; otherwise aborts the request
    yield _sse("[DONE]")
