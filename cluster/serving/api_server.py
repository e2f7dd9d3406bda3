"""OpenAI-compatible HTTP frontend over an `EngineClient`: `/v1/completions`,
`/v1/chat/completions` (streaming or not, `n` parallel samples), `/v1/models`,
`/health` and `/metrics`, and the replica admin routes under `/admin` (`admin_api`).

Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: a bad
request is a 400 whose message and `param` name the field; an unknown model a 404; a
missing or wrong API key a 401; a body over `max_request_bytes` a 413; a full queue a
429; a dead engine a 503. A bad request never affects the others: it is refused before
it reaches the engine, or by the engine's admission, which queues nothing when it refuses.
"""
from __future__ import annotations

import re
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from quire.cluster.serving.auth import key_matches
from quire.cluster.serving.engine_client import EngineClient, EngineDeadError, QueueFullError, RequestFailedError
from quire.cluster.serving.metrics import CONTENT_TYPE, ServerMetrics
from quire.cluster.serving.openai_protocol import (
    ChatCompletionRequest,
    CompletionLogprobs,
    CompletionRequest,
    chat_logprobs,
)
from quire.cluster.serving.openai_streams import ClientGone, ResponseStream
from quire.protos.step import SamplingParams
from starlette.exceptions import HTTPException as StarletteHTTPException

OPEN_PATHS = ("/health", "/metrics")  # answered without an API key, for probes and scrapers
MAX_REQUEST_BYTES = 32 << 20


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code


def error_response(status: int, message: str, param: str | None = None,
                   type: str = "invalid_request_error", code: str | int | None = None) -> JSONResponse:
    # A message may quote the client's input, which may hold what UTF-8 cannot (a lone surrogate
    # from a JSON escape): such characters are sent escaped rather than failing the answer.
    message, param = (None if text is None else text.encode("utf-8", "backslashreplace").decode()
                      for text in (message, param))
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status)


def _param_of(message: str) -> str | None:
    """The engine names the offending field in backticks (e.g. "`max_tokens` must be ...")."""
    match = re.search(r"`(\w+)`", message)
    return match.group(1) if match else None


def _bad_request(error: ValueError) -> APIError:
    return APIError(400, str(error), _param_of(str(error)))


def _replica_entry(stats) -> dict:
    return {"name": stats.name, "state": stats.state, "healthy": stats.healthy, "num_running": stats.num_running,
            "num_waiting": stats.num_waiting, "kv_usage": stats.kv_usage, "reason": stats.failure}


def build_app(engine: EngineClient, api_key: str | None = None, metrics: ServerMetrics | None = None,
              max_request_bytes: int = MAX_REQUEST_BYTES, on_startup=None, on_shutdown=None) -> FastAPI:
    """The HTTP app. Its lifespan starts the engine loop (and runs `on_startup`/`on_shutdown`
    coroutines, e.g. the gRPC server sharing this event loop); the caller owns engine shutdown."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        if on_startup is not None:
            await on_startup()
        try:
            yield
        finally:
            if on_shutdown is not None:
                await on_shutdown()

    app = FastAPI(title="quire", lifespan=lifespan)
    app.state.engine = engine
    served = engine.model
    tokenizer, model_name = served.tokenizer, served.name

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key is not None and request.url.path not in OPEN_PATHS \
                and not key_matches(request.headers.get("authorization"), api_key):
            return error_response(401, "Missing or invalid API key: send `Authorization: Bearer <key>`",
                                  type="authentication_error", code="invalid_api_key")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_request_bytes:
            return error_response(413, f"the request body ({length} bytes) exceeds {max_request_bytes} bytes",
                                  code=413)
        return await call_next(request)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.type, exc.code)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
        loc = [p for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, f"Invalid JSON body: {first.get('ctx', {}).get('error', first['msg'])}")
        if not loc:
            return error_response(400, f"Invalid request body: {first['msg']}")
        field = str(loc[0])
        same = [e for e in errors if [p for p in e.get("loc", ()) if p != "body"][:1] == [loc[0]]]
        if len(same) > 1:  # a union (e.g. `prompt`): one error per alternative type
            reasons = "; ".join(dict.fromkeys(e["msg"] for e in same))
            message = f"`{field}` has an invalid type or value ({reasons})"
        else:
            where = ".".join(str(p) for p in loc)
            shown = "input" in first and first["type"] not in ("extra_forbidden", "missing")
            message = f"`{where}`: {first['msg']}" + (f" (got {first['input']!r})" if shown else "")
        return error_response(400, message, field)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), code=exc.status_code)

    @app.exception_handler(Exception)
    async def on_unexpected_error(request: Request, exc: Exception):
        return error_response(500, f"internal error: {exc!r}", type="internal_server_error", code=500)

    @app.get("/health")
    async def health():
        stats = engine.stats()
        state = {"num_running": stats.num_running, "num_waiting": stats.num_waiting, "kv_usage": stats.kv_usage}
        if stats.replicas:
            state["replicas"] = [_replica_entry(r) for r in stats.replicas]
        if stats.failure is None:
            return {"status": "ok", **state}
        return JSONResponse({"status": "unhealthy", "reason": stats.failure, **state}, 503)

    @app.get("/v1/replicas")
    async def replicas():
        """Every data-parallel replica and its state (a single engine lists itself)."""
        stats = engine.stats()
        entries = [_replica_entry(r) for r in stats.replicas] or [{**_replica_entry(stats), "name": "0"}]
        return {"object": "list", "data": entries}

    @app.get("/metrics")
    async def prometheus_metrics():
        if metrics is None:
            raise APIError(404, "metrics are not enabled on this server", code=404)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    from quire.cluster.serving.admin_api import add_admin_routes  # here: it builds on this module's errors
    add_admin_routes(app, engine)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": int(time.time()), "owned_by": "quire",
            "max_model_len": served.max_model_len}]}

    def check_model(requested: str | None) -> None:
        if requested is not None and requested != model_name:
            raise APIError(404, f"The model `{requested}` does not exist; this server serves `{model_name}`",
                           "model", code="model_not_found")
        failure = engine.failure
        if failure is not None:
            raise APIError(503, failure, type="service_unavailable")

    async def start(prompt, params: SamplingParams, body, request_id: str, raw: Request) -> ResponseStream:
        """Queue the request (its `n` samples are the engine's) and wait for its first output,
        so that every refusal surfaces before a response starts; ends it on a refusal or a
        disconnect."""
        response = ResponseStream(engine.generate(prompt, params, request_id, cache_salt=body.cache_salt), raw)
        try:
            await response.first_output()
        except ValueError as exc:
            raise _bad_request(exc) from None
        except QueueFullError as exc:
            raise APIError(429, str(exc), type="rate_limit_error", code="queue_full") from None
        except EngineDeadError as exc:
            raise APIError(503, str(exc), type="service_unavailable") from None
        except RequestFailedError as exc:
            raise APIError(500, f"the request failed: {exc}", type="internal_server_error", code=500) from None
        except ClientGone:
            raise APIError(499, "the client disconnected", code=499) from None  # nobody reads this
        return response

    async def respond(response: ResponseStream, body, render_chunk, render_final, usage_head: dict):
        if body.stream:  # from here on Starlette cancels the body iterator on disconnect
            return StreamingResponse(response.sse(render_chunk, usage_head if body.include_usage else None),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            final = await response.collect()
        except ClientGone:
            return Response(status_code=499)  # nobody reads this
        except (EngineDeadError, RequestFailedError) as exc:
            raise APIError(500, str(exc), type="internal_server_error", code=500) from None
        return render_final(final.outputs, response.usage())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        check_model(body.model)
        try:
            params, prompt = body.sampling_params(), body.single_prompt()
        except ValueError as exc:
            raise _bad_request(exc) from None
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        response = await start(prompt, params, body, request_id, raw)
        builders = [CompletionLogprobs(tokenizer) if params.logprobs is not None else None for _ in range(body.n)]
        head = {"id": request_id, "object": "text_completion", "created": created, "model": model_name}

        def chunk(delta):
            logprobs = None
            if builders[delta.index] is not None:
                logprobs = builders[delta.index].build(delta.token_ids, delta.logprobs or [])
            if not (delta.text or delta.finish_reason or logprobs):
                return None
            return {**head, "choices": [{"index": delta.index, "text": delta.text, "logprobs": logprobs,
                                         "finish_reason": delta.finish_reason}]}

        def final(completions, usage):
            return {**head, "usage": usage, "choices": [
                {"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                 "logprobs": CompletionLogprobs(tokenizer).build(c.token_ids, c.logprobs or [])
                 if params.logprobs is not None else None}
                for c in completions]}

        return await respond(response, body, chunk, final, head)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        check_model(body.model)
        if tokenizer is None:
            raise APIError(400, "`messages`: chat needs a tokenizer, and this server was started with "
                                "--skip-tokenizer-init; send token ids to /v1/completions", "messages")
        if getattr(tokenizer, "chat_template", None) is None:
            raise APIError(400, "the model has no chat template; start the server with --chat-template", "messages")
        try:
            text = tokenizer.apply_chat_template(body.conversation(), add_generation_prompt=body.add_generation_prompt,
                                                 tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template's own error (e.g. roles it refuses) is the caller's
            raise APIError(400, f"`messages` cannot be rendered by the chat template: {exc}", "messages") from None
        try:
            prompt_ids = served.encode_text(text, "messages", add_special_tokens=False)
        except ValueError as exc:
            raise _bad_request(exc) from None
        try:
            params = body.sampling_params(room_left=served.max_model_len - len(prompt_ids))
        except ValueError as exc:
            raise _bad_request(exc) from None
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        response = await start(prompt_ids, params, body, request_id, raw)
        head = {"id": request_id, "created": created, "model": model_name}
        started = [False] * body.n
        top = body.top_logprobs or 0

        def chunk(completion):
            index, delta = completion.index, {}
            if not started[index]:
                started[index], delta = True, {"role": "assistant", "content": ""}
            if completion.text:
                delta["content"] = delta.get("content", "") + completion.text
            logprobs = chat_logprobs(tokenizer, completion.token_ids, completion.logprobs or [], top) \
                if body.logprobs else None
            if not (delta or completion.finish_reason or logprobs):
                return None
            return {**head, "object": "chat.completion.chunk", "choices": [
                {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": completion.finish_reason}]}

        def final(completions, usage):
            return {**head, "object": "chat.completion", "usage": usage, "choices": [
                {"index": c.index, "message": {"role": "assistant", "content": c.text},
                 "logprobs": chat_logprobs(tokenizer, c.token_ids, c.logprobs or [], top) if body.logprobs else None,
                 "finish_reason": c.finish_reason}
                for c in completions]}

        return await respond(response, body, chunk, final, {**head, "object": "chat.completion.chunk"})

    return app
