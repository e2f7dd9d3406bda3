"""A generation request as the controller tracks it."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from quire.protos.step import SamplingParams, TokenSequence


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"       # blocks freed: recomputes from scratch (or from cached prefix) when resumed
    SWAPPED = "swapped"           # blocks in the workers' CPU pool: copied back when resumed
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"      # failed on its own (its row of a step, its output): the client gets the error

    @property
    def finished(self) -> bool:
        return self.name.startswith("FINISHED")


@dataclass(eq=False)  # an entity: queues find and remove it by identity, not by comparing fields
class Request(TokenSequence):
    """Token-level state. Every token of the request lives here (prompt and outputs), so a
    request can be replayed on fresh workers; the workers hold only a cache of it.

    `num_computed_tokens` counts tokens whose KV is in the cache; each step the scheduler
    lets it catch up to `num_tokens` plus `num_pending_tokens` (tokens that steps in flight
    will sample: positions whose KV the next step can already compute, the workers knowing
    the token). `num_tokens_sent`/`num_blocks_sent` count what the workers already know
    (pending tokens included), so a StepPlan carries only what is new.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    prompt: str | None = None
    priority: int = 0              # lower runs first and is preempted last
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    # The newest output token's logprobs ({token: logprob}, sampled first); the engine hands them
    # on with the token, so older ones are not kept: a long generation holds no growing list.
    latest_logprobs: dict[int, float] | None = None
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    num_tokens_sent: int = 0
    num_blocks_sent: int = 0
    num_preemptions: int = 0
    first_token_time: float | None = None
    handle: int = 0                # the request's id on the wire, set by the scheduler
    cache_salt: str | None = None  # enters the first block's hash: only equal salts share prefixes
    fork_of: Request | None = None # parallel sampling: share this leader's prompt blocks (until admitted)
    cow_block: int | None = None   # index of a table block others may share, to copy before writing it
    # Tokens sampled by steps in flight, not yet received (0 to 2: the controller plans one step ahead).
    num_pending_tokens: int = 0
    max_num_tokens: int = 0        # prompt + outputs at most (0: prompt + max_tokens); set by the engine

    def __post_init__(self):
        if not self.max_num_tokens:
            self.max_num_tokens = len(self.prompt_token_ids) + self.sampling_params.max_tokens

    @property
    def sort_key(self) -> tuple[int, float]:
        """Ascending order of service: higher priority (lower value) first, then earlier arrival."""
        return (self.priority, self.arrival_time)
