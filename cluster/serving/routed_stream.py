"""A client's stream as the router keeps it: what the client has received, sample by
sample, so that any unfinished sample can continue on another replica token-exact."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from quire.cluster.core.outputs import CompletionOutput, RequestOutput
from quire.protos.step import SamplingParams


@dataclass
class RoutedStream:
    """One request through the router. `tokens[i]`: the token ids sample `i` has delivered;
    `finished`: the samples that ended. Owned by the router's event loop."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: str | None
    priority: int
    queue: asyncio.Queue               # what `generate` yields: outputs, or the exception that ends it
    tokens: dict[int, list[int]]
    finished: set[int] = field(default_factory=set)
    started: bool = False              # a delta has gone to the client: refusals are over
    generation: int = 0                # continuations so far (names them)
    arrival: float = 0.0               # loop time of the request's arrival
    first_token: float | None = None

    @property
    def done(self) -> bool:
        return len(self.finished) == len(self.tokens)

    def unfinished(self, indexes=None) -> list[int]:
        return [index for index in (self.tokens if indexes is None else indexes) if index not in self.finished]

    def continuation(self, index: int) -> tuple[str, SamplingParams, list[int] | None]:
        """The sub-request that continues sample `index` elsewhere: its id (fresh, so a late
        word from the old replica cannot be mistaken for it), its one-sample parameters (the
        sample's own seed) and the tokens it resumes from (None when it has none yet)."""
        self.generation += 1
        return (f"{self.request_id}#m{self.generation}", self.params.for_sample(index),
                list(self.tokens[index]) or None)

    def accept(self, indexes: list[int], output: RequestOutput) -> tuple[RequestOutput, int]:
        """Record a replica's delta for the samples `indexes` (its sample i is the client's
        `indexes[i]`): returns the client's delta (finished once every sample is) and how
        many tokens it carries."""
        completions, new_tokens = [], 0
        for completion in output.outputs:
            index = indexes[completion.index]
            completion.index = index
            self.tokens[index].extend(completion.token_ids)
            new_tokens += len(completion.token_ids)
            if completion.finish_reason is not None:
                self.finished.add(index)
            completions.append(completion)
        return (RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, completions, self.done,
                              output.error), new_tokens)

    def abort_output(self) -> RequestOutput:
        """The final output of an aborted stream: "abort" for every unfinished sample."""
        final = [CompletionOutput(index, "", [], finish_reason="abort") for index in sorted(self.unfinished())]
        self.finished.update(c.index for c in final)
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, final, True)


@dataclass
class Placement:
    """One request handed to a replica: the whole stream (`indexes` = every sample), or one
    sample continued after a migration."""
    sub_id: str
    stream: RoutedStream
    replica_id: str
    indexes: list[int]                 # the client's sample indexes it serves (its own index i → indexes[i])
