"""Domain types of the controller↔worker contract (`quire.v1.Worker`).

Protobuf stays at the edges: the scheduler builds a `StepPlan`, the executor calls
`to_pb()` once per step, and the worker reads it back with `StepPlan.from_pb()`.
A plan is incremental: `NewRequestData` carries a request in full the first time it
is scheduled; afterwards `CachedRequestData` carries only deltas, so the plan's size
depends on the number of scheduled requests, never on their lengths.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from quire.protos import worker_pb2 as pb
from quire.protos.limits import MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, SAMPLING_LIMITS, UINT64, shown

# In a plan's token ids: "the token sampled for this request by the step before this one".
# The controller plans a step while the previous one runs (asynchronous scheduling), so it
# does not know that token yet; the workers do.
PLACEHOLDER_TOKEN = -1

# Sampling numbers that may be unset (None): only a set value is checked against its limit.
_OPTIONAL_NUMBERS = ("seed", "logprobs")


class TokenSequence:
    """A request's tokens as two lists, the prompt then the outputs, read without joining them.

    A mixin for the controller's `Request` and the worker's `RequestState`, which hold
    `prompt_token_ids` and `output_token_ids`; it adds no field and no state."""

    __slots__ = ()
    prompt_token_ids: list[int]
    output_token_ids: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """Token ids (prompt then output) at positions `start..end-1`, without joining the lists."""
        prompt_len = len(self.prompt_token_ids)
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        if start >= prompt_len:
            return self.output_token_ids[start - prompt_len:end - prompt_len]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - prompt_len]

    def tokens_from(self, start: int) -> list[int]:
        """All token ids (prompt then output) from index `start` on."""
        return self.token_slice(start, self.num_tokens)


@dataclass
class SamplingParams:
    """How to pick each output token and when to stop.

    `temperature == 0` (or `top_k == 1`) is greedy. `top_k <= 0` disables top-k.
    Penalties follow OpenAI (presence, frequency: subtracted from logits of tokens
    already in the output) and HF/CTRL (repetition: logits of tokens in prompt or
    output divided by it when positive, multiplied when negative).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    n: int = 1  # parallel samples of the prompt (LLM.generate); they share its KV blocks

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the offending field: every number against its wire type and
        range (`quire.protos.limits`), token ids against `vocab_size` when given."""

        def bad(name: str, why: str) -> None:
            raise ValueError(f"sampling params: `{name}` {why} (got {shown(getattr(self, name))})")

        for name, limit in SAMPLING_LIMITS.items():
            value = getattr(self, name)
            if name == "stop_token_ids":
                for token_id in value:
                    limit.check(token_id, element=True)
            elif value is not None or name not in _OPTIONAL_NUMBERS:
                limit.check(value)
        if vocab_size is not None and any(t >= vocab_size for t in self.stop_token_ids):
            bad("stop_token_ids", f"must hold token ids < vocab_size {vocab_size}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must hold non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            bad("stop", f"may hold at most {MAX_STOP_STRINGS} strings")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            bad("stop_token_ids", f"may hold at most {MAX_STOP_TOKEN_IDS} token ids")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be true or false")

    def for_sample(self, index: int) -> SamplingParams:
        """The parameters of sample `index` of `n`: one sequence, and a seed offset by the index
        so that seeded samples differ (and stay reproducible)."""
        seed = None if self.seed is None else (self.seed + index) % (UINT64[1] + 1)  # stays a uint64
        return SamplingParams(**{**vars(self), "n": 1, "seed": seed})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def to_pb(self) -> pb.SamplingParams:
        """What the workers are sent: the `SamplingSpec` of these params."""
        return SamplingSpec.from_params(self).to_pb()

    @classmethod
    def from_pb(cls, msg: pb.SamplingParams) -> SamplingParams:
        """Params with the wire's sampling fields and defaults for the rest (workers read a
        `SamplingSpec` instead; this shows what a value becomes on its way)."""
        return cls(**vars(SamplingSpec.from_pb(msg)))


@dataclass(frozen=True)
class SamplingSpec:
    """Exactly what a worker reads to sample a request's tokens: the part of `SamplingParams`
    that travels in `quire.v1.SamplingParams`. Stopping, detokenizing and `n` stay with the
    controller. Fields mean what they mean in SamplingParams; `greedy` likewise."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    @classmethod
    def from_params(cls, params: SamplingParams) -> SamplingSpec:
        """The spec of (already validated) user-facing params."""
        return cls(**{name: getattr(params, name) for name in _SPEC_FIELDS})

    def validate(self) -> None:
        """Raise ValueError naming the first field outside its limit (`quire.protos.limits`), in
        the order and with the message `SamplingParams.validate` would give."""
        for name, limit in SAMPLING_LIMITS.items():
            if name in _SPEC_FIELDS:
                value = getattr(self, name)
                if value is not None or name not in _OPTIONAL_NUMBERS:
                    limit.check(value)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def to_pb(self) -> pb.SamplingParams:
        return pb.SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            has_seed=self.seed is not None, seed=self.seed or 0,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logprobs=-1 if self.logprobs is None else self.logprobs,
        )

    @classmethod
    def from_pb(cls, msg: pb.SamplingParams) -> SamplingSpec:
        """The spec a message carries; ValueError when a value is outside its limit (the wire is
        the worker's trust boundary: it refuses what the controller would have)."""
        spec = cls(
            temperature=msg.temperature, top_p=msg.top_p, top_k=msg.top_k, min_p=msg.min_p,
            seed=msg.seed if msg.has_seed else None,
            presence_penalty=msg.presence_penalty, frequency_penalty=msg.frequency_penalty,
            repetition_penalty=msg.repetition_penalty,
            logprobs=None if msg.logprobs < 0 else msg.logprobs,
        )
        spec.validate()
        return spec


_SPEC_FIELDS = tuple(f.name for f in fields(SamplingSpec))


@dataclass
class NewRequestData:
    """A request the workers have not seen: sent in full once. `handle` names it on the
    wire from then on (a small integer, so deltas stay a few bytes). `sampling_spec` is
    all the workers learn of the request's sampling parameters."""

    handle: int
    request_id: str
    prompt_token_ids: list[int]
    sampling_spec: SamplingSpec
    block_ids: list[int]
    num_computed_tokens: int
    output_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Callers holding the user's SamplingParams may pass them: only their spec is kept,
        # so a plan compares equal to itself after the wire.
        if isinstance(self.sampling_spec, SamplingParams):
            self.sampling_spec = SamplingSpec.from_params(self.sampling_spec)

    def to_pb(self) -> pb.NewRequest:
        return pb.NewRequest(
            handle=self.handle, request_id=self.request_id, prompt_token_ids=self.prompt_token_ids,
            sampling_params=self.sampling_spec.to_pb(), block_ids=self.block_ids,
            num_computed_tokens=self.num_computed_tokens, output_token_ids=self.output_token_ids,
        )

    @classmethod
    def from_pb(cls, msg: pb.NewRequest) -> NewRequestData:
        return cls(
            handle=msg.handle, request_id=msg.request_id, prompt_token_ids=list(msg.prompt_token_ids),
            sampling_spec=SamplingSpec.from_pb(msg.sampling_params), block_ids=list(msg.block_ids),
            num_computed_tokens=msg.num_computed_tokens, output_token_ids=list(msg.output_token_ids),
        )


@dataclass
class CachedRequestData:
    """Deltas for a request the workers already hold.

    `new_token_ids` are tokens appended since the request was last in a plan (the
    outputs sampled meanwhile). `new_block_ids` extend the block table, or replace it
    when `replace_table` (after preemption, or when copy-on-write replaced a block).
    """

    handle: int
    new_token_ids: list[int]
    new_block_ids: list[int]
    num_computed_tokens: int
    replace_table: bool = False

    def to_pb(self) -> pb.CachedRequest:
        return pb.CachedRequest(
            handle=self.handle, new_token_ids=self.new_token_ids, new_block_ids=self.new_block_ids,
            num_computed_tokens=self.num_computed_tokens, replace_table=self.replace_table,
        )

    @classmethod
    def from_pb(cls, msg: pb.CachedRequest) -> CachedRequestData:
        return cls(
            handle=msg.handle, new_token_ids=list(msg.new_token_ids),
            new_block_ids=list(msg.new_block_ids), num_computed_tokens=msg.num_computed_tokens,
            replace_table=msg.replace_table,
        )


@dataclass
class StepPlan:
    """One step's work, in batch order: first the plain decodes, then the requests of
    `num_scheduled_tokens` (handle → tokens to compute now). A plain decode computes
    exactly the one token sampled since its request's last plan (`decode_token_ids[i]`
    for `decode_handles[i]`); when that token starts a new block, `decode_block_ids[j]`
    is appended to the table of `decode_block_handles[j]`. The common case, kept as flat
    lists so that building, sending and applying it costs little per request.
    Every request of `num_scheduled_tokens` appears in `new_requests` or
    `cached_requests`. `finished_handles` lets workers drop state."""

    step_id: int
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[int, int] = field(default_factory=dict)
    finished_handles: list[int] = field(default_factory=list)
    decode_handles: list[int] = field(default_factory=list)
    decode_token_ids: list[int] = field(default_factory=list)
    decode_block_handles: list[int] = field(default_factory=list)
    decode_block_ids: list[int] = field(default_factory=list)
    # (source, destination) block moves before the forward pass, in this order:
    swap_out: list[tuple[int, int]] = field(default_factory=list)     # device → CPU pool
    swap_in: list[tuple[int, int]] = field(default_factory=list)      # CPU pool → device
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # device → device (copy-on-write)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values()) + len(self.decode_handles)

    @property
    def moves_blocks(self) -> bool:
        return bool(self.swap_out or self.swap_in or self.block_copies)

    @property
    def has_work(self) -> bool:
        """Whether the workers have anything to do: tokens to compute, state to drop, blocks to move."""
        return bool(self.num_scheduled_requests or self.finished_handles or self.moves_blocks)

    @property
    def num_scheduled_requests(self) -> int:
        return len(self.decode_handles) + len(self.num_scheduled_tokens)

    def scheduled(self) -> list[tuple[int, int]]:
        """(handle, tokens to compute) for every scheduled request, in batch order."""
        return [(handle, 1) for handle in self.decode_handles] + list(self.num_scheduled_tokens.items())

    def to_pb(self) -> pb.StepPlan:
        fields = dict(
            new_requests=[r.to_pb() for r in self.new_requests],
            cached_requests=[r.to_pb() for r in self.cached_requests],
            scheduled_handles=list(self.num_scheduled_tokens),
            num_scheduled_tokens=list(self.num_scheduled_tokens.values()),
            finished_handles=self.finished_handles,
            decode_handles=self.decode_handles,
            decode_token_ids=self.decode_token_ids,
            decode_block_handles=self.decode_block_handles,
            decode_block_ids=self.decode_block_ids,
            swap_out_src=[s for s, _ in self.swap_out], swap_out_dst=[d for _, d in self.swap_out],
            swap_in_src=[s for s, _ in self.swap_in], swap_in_dst=[d for _, d in self.swap_in],
            copy_src=[s for s, _ in self.block_copies], copy_dst=[d for _, d in self.block_copies],
        )
        # Empty fields left out: each one passed costs as much as a short list (half of a decode plan's cost).
        return pb.StepPlan(step_id=self.step_id, **{name: value for name, value in fields.items() if value})

    @classmethod
    def from_pb(cls, msg: pb.StepPlan) -> StepPlan:
        return cls(
            step_id=msg.step_id,
            new_requests=[NewRequestData.from_pb(r) for r in msg.new_requests],
            cached_requests=[CachedRequestData.from_pb(r) for r in msg.cached_requests],
            num_scheduled_tokens=dict(zip(msg.scheduled_handles, msg.num_scheduled_tokens)),
            finished_handles=list(msg.finished_handles),
            decode_handles=list(msg.decode_handles),
            decode_token_ids=list(msg.decode_token_ids),
            decode_block_handles=list(msg.decode_block_handles),
            decode_block_ids=list(msg.decode_block_ids),
            swap_out=list(zip(msg.swap_out_src, msg.swap_out_dst)),
            swap_in=list(zip(msg.swap_in_src, msg.swap_in_dst)),
            block_copies=list(zip(msg.copy_src, msg.copy_dst)),
        )


@dataclass
class SampledLogprobs:
    """The logprob of a sampled token and the most likely alternatives (best first)."""

    logprob: float
    top_logprobs: dict[int, float]

    def to_pb(self, handle: int) -> pb.SampledLogprobs:
        msg = pb.SampledLogprobs(handle=handle, logprob=self.logprob)
        for token_id, logprob in self.top_logprobs.items():
            msg.top_logprobs.add(token_id=token_id, logprob=logprob)
        return msg

    @classmethod
    def from_pb(cls, msg: pb.SampledLogprobs) -> SampledLogprobs:
        return cls(msg.logprob, {t.token_id: t.logprob for t in msg.top_logprobs})


@dataclass
class StepResult:
    """What a rank answers for one StepPlan; only rank 0's carries tokens: `sampled_token_ids[i]`
    for `sampled_handles[i]`, one per request that reached the end of its known tokens, and
    `logprobs` (by handle) for those of them that asked. A request whose own sampling failed
    is in `errors` instead of `sampled_handles`."""

    step_id: int
    rank: int = 0
    sampled_handles: list[int] = field(default_factory=list)
    sampled_token_ids: list[int] = field(default_factory=list)
    logprobs: dict[int, SampledLogprobs] = field(default_factory=dict)
    forward_seconds: float = 0.0
    # Requests that failed on their own this step (no token for them), by handle: why.
    errors: dict[int, str] = field(default_factory=dict)

    def to_pb(self) -> pb.StepResult:
        return pb.StepResult(
            step_id=self.step_id, rank=self.rank, sampled_handles=self.sampled_handles,
            sampled_token_ids=self.sampled_token_ids,
            logprobs=[lp.to_pb(handle) for handle, lp in self.logprobs.items()],
            forward_seconds=self.forward_seconds,
            failed_handles=list(self.errors), failed_errors=list(self.errors.values()),
        )

    @classmethod
    def from_pb(cls, msg: pb.StepResult) -> StepResult:
        return cls(
            step_id=msg.step_id, rank=msg.rank, sampled_handles=list(msg.sampled_handles),
            sampled_token_ids=list(msg.sampled_token_ids),
            logprobs={lp.handle: SampledLogprobs.from_pb(lp) for lp in msg.logprobs},
            forward_seconds=msg.forward_seconds,
            errors=dict(zip(msg.failed_handles, msg.failed_errors)),
        )
