"""The gRPC frontend: `quire.v1.Generate` and `quire.v1.Admin` (replicas, see `admin_api`)
over an `EngineClient`, with the standard `grpc.health.v1` service (NOT_SERVING while the
engine or any worker is down) and server reflection beside it, all on one asyncio server
that shares the HTTP server's loop.

Contracts: a bad request fails with INVALID_ARGUMENT naming the field, an unknown model
with NOT_FOUND, a full queue with RESOURCE_EXHAUSTED, a dead engine with UNAVAILABLE; a
cancelled call or a passed deadline aborts its request (freeing its blocks). With an
API key, calls of `quire.v1.Generate` and `quire.v1.Admin` need `authorization: Bearer KEY`
metadata (UNAUTHENTICATED otherwise); health and reflection stay open.
"""
from __future__ import annotations

import asyncio
import logging
import uuid

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from quire.cluster.serving.auth import key_matches
from quire.cluster.core.outputs import CompletionOutput, best_candidates
from quire.cluster.serving.engine_client import EngineClient, EngineDeadError, QueueFullError, RequestFailedError
from quire.protos import admin_pb2, admin_pb2_grpc
from quire.protos import generate_pb2 as pb
from quire.protos import generate_pb2_grpc
from quire.protos.limits import shown
from quire.protos.step import SamplingParams

logger = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Generate"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
GUARDED = (f"/{SERVICE}/", f"/{ADMIN_SERVICE}/")  # the API key's services: all but health and reflection
HEALTH_POLL_SECONDS = 0.5


def sampling_from_pb(options: pb.SamplingOptions) -> SamplingParams:
    """Engine parameters from the wire; unset optional fields keep their defaults. Raises
    ValueError naming the field."""
    given = {name: getattr(options, name) for name in (
        "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "logprobs", "presence_penalty",
        "frequency_penalty", "repetition_penalty", "skip_special_tokens", "n") if options.HasField(name)}
    return SamplingParams(stop=list(options.stop), stop_token_ids=list(options.stop_token_ids),
                          ignore_eos=options.ignore_eos, **given)


# A status message travels in a trailer, which clients refuse beyond 16 KiB: a message that
# quotes the client's input (a huge request id or model name) is cut well below that.
MAX_STATUS_MESSAGE = 1024


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str):
    if len(message) > MAX_STATUS_MESSAGE:
        message = message[:MAX_STATUS_MESSAGE - 20] + " ... (message cut)"
    await context.abort(code, message)


class _ParseInHandler(grpc.aio.ServerInterceptor):
    """Parses the guarded services' request messages inside the call, so that bytes that are
    not a valid message (truncated, corrupt, a string that is not UTF-8) are INVALID_ARGUMENT,
    as any other bad input, instead of the UNKNOWN gRPC answers for a failed deserializer."""

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(GUARDED) or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        async def parsed(raw: bytes, context):
            try:
                return parse(raw)
            except DecodeError as error:
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid message: {error}")

        if handler.unary_stream is not None:
            async def unary_stream(raw, context):
                request = await parsed(raw, context)
                async for response in handler.unary_stream(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(unary_stream, response_serializer=handler.response_serializer)
        if handler.unary_unary is not None:
            async def unary_unary(raw, context):
                return await handler.unary_unary(await parsed(raw, context), context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, response_serializer=handler.response_serializer)
        return handler


class GenerateServicer(generate_pb2_grpc.GenerateServicer):
    def __init__(self, engine: EngineClient):
        self.engine = engine
        self.model = engine.model
        self.tokenizer = self.model.tokenizer

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        """Streams every sample's deltas (n of them, interleaved as they come, each message
        naming its `index`). A refusal ends the call with its status before any message."""
        if request.model and request.model != self.model.name:
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"`model` {shown(request.model)} is not served here; "
                                                          f"this server serves {self.model.name!r}")
        which = request.WhichOneof("prompt")
        if which is None:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "`prompt`: set `text` or `token_ids`")
        prompt = request.text if which == "text" else list(request.token_ids.ids)
        try:
            params = sampling_from_pb(request.sampling)
        except ValueError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        request_id = request.request_id or f"grpc-{uuid.uuid4().hex}"
        stream = self.engine.generate(prompt, params, request_id, cache_salt=request.cache_salt or None)
        sent = [0] * params.n  # tokens sent per sample, for its usage
        try:
            async for output in stream:
                for completion in output.outputs:
                    yield self._message(request_id, completion, output.prompt_token_ids, params.logprobs, sent)
        except ValueError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except QueueFullError as exc:
            await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except EngineDeadError as exc:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, str(exc))
        except RequestFailedError as exc:  # its own failure in a step; the engine serves the others on
            await _abort(context, grpc.StatusCode.INTERNAL, f"the request failed: {exc}")
        finally:
            await stream.aclose()  # runs on cancellation and deadline too: an unfinished request is aborted

    def _message(self, request_id: str, completion: CompletionOutput, prompt_token_ids: list[int],
                 logprobs: int | None, sent: list[int]) -> pb.GenerateResponse:
        """One sample's delta as a message (`sent[index]` counts the tokens it has sent; updated)."""
        message = pb.GenerateResponse(request_id=request_id, token_ids=completion.token_ids, text=completion.text,
                                      index=completion.index)
        if logprobs is not None and completion.token_ids:
            for token_id, candidates in zip(completion.token_ids, completion.logprobs):
                message.logprobs.append(self._logprobs(token_id, candidates, logprobs))
        sent[completion.index] += len(completion.token_ids)
        if completion.finish_reason is not None:
            message.finish_reason = completion.finish_reason
            if isinstance(completion.stop_reason, str):
                message.stop_reason = completion.stop_reason
            message.usage.prompt_tokens = len(prompt_token_ids)
            message.usage.completion_tokens = sent[completion.index]
        return message

    def _logprobs(self, token_id: int, candidates: dict[int, float], top: int) -> pb.GeneratedTokenLogprobs:
        """Text "" with no tokenizer (--skip-tokenizer-init): `token_id` says which token it is."""
        def entry(tid: int, logprob: float) -> pb.TokenWithLogprob:
            text = self.tokenizer.decode([tid]) if self.tokenizer is not None else ""
            return pb.TokenWithLogprob(token_id=tid, logprob=logprob, text=text)

        return pb.GeneratedTokenLogprobs(token=entry(token_id, candidates.get(token_id, float("-inf"))),
                                         top=[entry(t, lp) for t, lp in best_candidates(candidates, top)])

    async def Abort(self, request: pb.AbortRequest, context):
        if not request.request_id:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "`request_id` must be set")
        live = self.engine.is_live(request.request_id)
        self.engine.abort(request.request_id)
        return pb.AbortResponse(aborted=live)

    async def GetModelInfo(self, request, context):
        model = self.model
        return pb.GetModelInfoResponse(
            model=model.name, max_model_len=model.max_model_len, vocab_size=model.vocab_size,
            eos_token_ids=sorted(model.eos_token_ids), tensor_parallel_size=model.tensor_parallel_size,
            block_size=model.block_size, num_kv_blocks=model.num_kv_blocks)

    async def GetServerInfo(self, request, context):
        stats = self.engine.stats()
        replicas = [pb.ReplicaInfo(name=r.name, state=r.state, num_running=r.num_running, num_waiting=r.num_waiting,
                                   kv_cache_usage=r.kv_usage, healthy=r.healthy) for r in stats.replicas]
        return pb.GetServerInfoResponse(
            num_running=stats.num_running, num_waiting=stats.num_waiting, kv_cache_usage=stats.kv_usage,
            max_queue_len=stats.max_queue_len, healthy=stats.healthy, replicas=replicas)

    async def Tokenize(self, request: pb.TokenizeRequest, context):
        if self.tokenizer is None:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                                "Tokenize needs a tokenizer; this server was started with --skip-tokenizer-init")
        ids = self.tokenizer.encode(request.text, add_special_tokens=request.add_special_tokens)
        return pb.TokenizeResponse(token_ids=ids, tokens=self.tokenizer.convert_ids_to_tokens(ids))


class _ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls of the guarded services without the right `authorization` metadata."""

    def __init__(self, api_key: str):
        self.api_key = api_key

        async def refuse(request, context):
            await _abort(context, grpc.StatusCode.UNAUTHENTICATED,
                                "missing or invalid API key: send metadata `authorization: Bearer <key>`")

        # A unary-unary refusal answers any call shape: it aborts before reading a response.
        self._refusal = grpc.unary_unary_rpc_method_handler(refuse)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if details.method.startswith(GUARDED):
            given = dict(details.invocation_metadata or ()).get("authorization")
            if not key_matches(given, self.api_key):
                return self._refusal
        return await continuation(details)


class GrpcFrontend:
    """The asyncio gRPC server: Generate, Admin, health and reflection. `start()` and `stop()`
    must run on the event loop that serves it (the HTTP server's, under `quire serve`)."""

    def __init__(self, engine: EngineClient, address: str, api_key: str | None = None,
                 tls: tuple[bytes, bytes] | None = None, max_message_bytes: int = 32 << 20):
        """`tls`: (private key PEM, certificate chain PEM); without it the port is plaintext."""
        self.engine = engine
        self.server = grpc.aio.server(
            interceptors=[*([_ApiKeyInterceptor(api_key)] if api_key else []), _ParseInHandler()],
            options=[("grpc.max_receive_message_length", max_message_bytes),
                     ("grpc.max_send_message_length", max_message_bytes)])
        generate_pb2_grpc.add_GenerateServicer_to_server(GenerateServicer(engine), self.server)
        from quire.cluster.serving.admin_api import AdminServicer  # here: it builds on this module's helpers
        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(engine), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [SERVICE, ADMIN_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], self.server)
        if tls is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, grpc.ssl_server_credentials([tls]))
        if self.port == 0:
            raise RuntimeError(f"cannot listen for gRPC on {address}")
        self._watch: asyncio.Task | None = None

    async def start(self) -> None:
        await self.server.start()
        await self._set_health()
        self._watch = asyncio.create_task(self._watch_health())

    async def _set_health(self) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if self.engine.healthy \
            else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE):
            await self.health.set(service, status)

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_POLL_SECONDS)
            await self._set_health()

    async def stop(self, grace: float = 2.0) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
