"""The serving contract: what `LLM`, the HTTP server and the gRPC server may ask of an engine.

`AsyncEngine` (one replica in this process) implements it; a global router in front of
many replicas implements the same protocol, so the frontends never know which they have.
Nothing here touches the engine's internals: callers see model facts, per-step deltas of
their own requests, and a load snapshot.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from quire.cluster.core.outputs import RequestOutput
from quire.protos.step import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine failed or was shut down; the request cannot complete."""


class QueueFullError(RuntimeError):
    """The queue of waiting requests is at `max_queue_len`: try again later."""


class RequestFailedError(RuntimeError):
    """The request failed on its own inside a step (the engine serves the others on)."""


@dataclass(frozen=True)
class ServedModel:
    """Facts about the model being served, fixed for the engine's lifetime."""

    name: str                    # the id clients address it by
    tokenizer: Any               # None with skip_tokenizer_init: token ids in, token ids out
    max_model_len: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    block_size: int              # KV geometry: tokens per block
    num_kv_blocks: int           # blocks in each replica's cache
    tensor_parallel_size: int
    encoder: Any = None          # a `ModelInfo`: `encode_text` with the engine's own checks

    @classmethod
    def from_info(cls, info, block_size: int, num_kv_blocks: int, tensor_parallel_size: int) -> ServedModel:
        """The facts of the model `info` (a `ModelInfo`) served with that KV geometry."""
        return cls(name=info.name, tokenizer=info.tokenizer, max_model_len=info.max_model_len,
                   vocab_size=info.vocab_size, eos_token_ids=frozenset(info.eos_token_ids), block_size=block_size,
                   num_kv_blocks=num_kv_blocks, tensor_parallel_size=tensor_parallel_size, encoder=info)

    def encode_text(self, text: str, field: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; ValueError naming `field` when it cannot be a prompt."""
        return self.encoder.encode_text(text, field, add_special_tokens=add_special_tokens)


@dataclass(frozen=True)
class StatsSnapshot:
    """Load and health at one moment (published after every engine step)."""

    num_running: int
    num_waiting: int
    kv_usage: float              # share of the KV blocks in use, 0..1
    failure: str | None          # why the engine is not serving; None while healthy
    max_queue_len: int = 0       # 0: no limit
    replicas: tuple[StatsSnapshot, ...] = ()  # each replica's own, where there are several
    name: str = ""               # a replica's id (in `replicas`)
    state: str = "serving"       # a replica's: serving | dead (being replaced) | stopped

    @property
    def healthy(self) -> bool:
        return self.failure is None


class EngineClient(Protocol):
    """Contracts every implementation keeps:

    * `generate` yields the request's outputs in order, each a delta (new token ids, new
      logprobs, new text of each sample that advanced; `n` samples are the engine's to fan
      out) and ends after the one with `finished`. Refusals come before any output:
      ValueError naming the field, QueueFullError, EngineDeadError. A request failing on its
      own raises RequestFailedError; a dead engine raises EngineDeadError in every stream.
      Closing the iterator before the end aborts the request, freeing its KV blocks.
    * `abort` ends a request from anywhere (its stream ends with finish_reason "abort");
      `is_live` says whether a request id is running now (a snapshot).
    * `model`, `stats()`, `healthy` and `failure` are cheap and callable from any thread.
    """

    @property
    def model(self) -> ServedModel: ...

    @property
    def healthy(self) -> bool: ...

    @property
    def failure(self) -> str | None: ...

    def stats(self) -> StatsSnapshot: ...

    def start(self) -> None: ...

    def shutdown(self) -> None: ...

    def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None, *,
                 cache_salt: str | None = None, priority: int = 0) -> AsyncIterator[RequestOutput]: ...

    def abort(self, request_id: str) -> None: ...

    def is_live(self, request_id: str) -> bool: ...
