"""Parallel sampling: a caller's request and the `n` samples that serve it.

The one place `n` is fanned out, for every entry point (`LLM`, HTTP, gRPC): the engine
turns each request into a `ParentRequest` and queues one scheduler request per sample.
"""
from __future__ import annotations

from quire.protos.step import SamplingParams


class ParentRequest:
    """Owns the `n` samples of one request: their ids, their parameters (seed `seed + i`),
    which are still running, and the order of the final outputs (by sample index).

    Sample ids: the request's own id when `n == 1`, else `<id>-<i>`, so a single sample is
    the request itself on the wire. Sample 0 leads: the others fork its prompt's KV blocks.
    """

    def __init__(self, request_id: str, params: SamplingParams):
        self.request_id = request_id
        self.params = params
        self.sample_ids = [request_id] if params.n == 1 else [f"{request_id}-{i}" for i in range(params.n)]
        self._unfinished = set(self.sample_ids)

    def sample_params(self, index: int) -> SamplingParams:
        """The parameters of sample `index`: one sequence, its seed offset by the index."""
        return self.params.for_sample(index)

    @property
    def live_sample_ids(self) -> list[str]:
        """The samples not finished yet, in index order."""
        return [sample_id for sample_id in self.sample_ids if sample_id in self._unfinished]

    def finish_sample(self, sample_id: str) -> bool:
        """Mark a sample finished; returns whether that finished the whole request."""
        self._unfinished.discard(sample_id)
        return not self._unfinished
