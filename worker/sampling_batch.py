"""The rows of one sampler call, with their per-row parameters on the device from one copy."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, fields

import numpy as np
import torch

from quire.protos.step import SamplingSpec
from quire.worker.seeded_noise import as_int64, row_seed
from quire.worker.step_inputs import StagingBuffer, float_bits


@dataclass
class SamplingRow:
    """One row of a batch: its request's sampling spec (anything with SamplingSpec's fields and
    `greedy`; a SamplingParams serves too) and its tokens so far, for penalties and seeds."""

    params: SamplingSpec
    prompt_token_ids: list[int]
    output_token_ids: list[int]


@dataclass
class RowTensors:
    """Device views of a batch's parameters. Indexes are int64: `greedy`, `rand` and `ask`
    (logprobs wanted) are row numbers; `seeded` / `unseeded` are positions among the `rand`
    rows, `seed_keys` the seeded rows' noise keys. Warper parameters (float32, but top_k)
    are for the `rand` rows in order, penalty weights for every row; the `*_grid` indexes
    are flat `row * vocab + token` entries to penalise. Unneeded ones are empty."""

    greedy: torch.Tensor
    rand: torch.Tensor
    ask: torch.Tensor
    seeded: torch.Tensor
    unseeded: torch.Tensor
    seed_keys: torch.Tensor
    top_k: torch.Tensor
    repetition_grid: torch.Tensor
    occurrence_grid: torch.Tensor
    temperature: torch.Tensor
    top_p_limit: torch.Tensor
    min_p: torch.Tensor
    repetition: torch.Tensor
    frequency: torch.Tensor
    presence: torch.Tensor


_FLOAT_FIELDS = ("temperature", "top_p_limit", "min_p", "repetition", "frequency", "presence")


def _grid_index(vocab: int, per_row: list[tuple[int, list[int]]]) -> np.ndarray:
    """Flat indices `row * vocab + token` into a `[rows, vocab]` grid; ids outside the
    vocab are dropped (an embedding may be larger than the LM head, as HF allows)."""
    lengths = np.fromiter((len(ids) for _, ids in per_row), dtype=np.int64, count=len(per_row))
    row_ids = np.repeat(np.fromiter((r for r, _ in per_row), dtype=np.int64, count=len(per_row)), lengths)
    ids = np.fromiter(itertools.chain.from_iterable(ids for _, ids in per_row), dtype=np.int64,
                      count=int(lengths.sum()))
    keep = (ids >= 0) & (ids < vocab)
    return (row_ids * vocab + ids)[keep]


def _index(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int64).reshape(-1)


class SamplingBatch(list):
    """A list of SamplingRow (usable wherever the rows are) whose host-side decisions are made
    once and whose per-row parameters reach the device in one staging copy (`tensors`).

    Host-side: `greedy`, `rand`, `ask` (row numbers), `repetition_rows`, `occurrence_rows`
    (rows setting those penalties), `use_top_k`, `use_top_p`, `use_min_p` (whether any
    `rand` row enables the warper), `top_n` (the most top logprobs any row asks for)."""

    def __init__(self, rows: list[SamplingRow], vocab: int, stager: StagingBuffer):
        super().__init__(rows)
        params = [r.params for r in rows]
        self.vocab = vocab
        self.greedy = [i for i, p in enumerate(params) if p.greedy]
        self.rand = [i for i, p in enumerate(params) if not p.greedy]
        self.ask = [i for i, p in enumerate(params) if p.logprobs is not None]
        self.top_n = min(max((params[i].logprobs for i in self.ask), default=0), vocab)
        self.repetition_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        self.occurrence_rows = [i for i, p in enumerate(params) if p.frequency_penalty != 0 or p.presence_penalty != 0]
        warped = [params[i] for i in self.rand]
        self.use_top_k = any(0 < p.top_k < vocab for p in warped)
        self.use_top_p = any(p.top_p < 1.0 for p in warped)
        self.use_min_p = any(p.min_p > 0 for p in warped)
        seeded = [j for j, p in enumerate(warped) if p.seed is not None]
        self.num_seeded = len(seeded)
        # The noise key of a seeded row: its seed and the position of the token it samples.
        keys = [as_int64(row_seed(warped[j].seed, len(rows[self.rand[j]].output_token_ids))) for j in seeded]
        penalised = self.repetition_rows or self.occurrence_rows
        host = dict(
            greedy=_index(self.greedy), rand=_index(self.rand), ask=_index(self.ask), seeded=_index(seeded),
            unseeded=_index([j for j, p in enumerate(warped) if p.seed is None]), seed_keys=_index(keys),
            top_k=_index([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in warped] if self.use_top_k else []),
            repetition_grid=_grid_index(vocab, [(i, rows[i].prompt_token_ids + rows[i].output_token_ids)
                                                for i in self.repetition_rows]),
            occurrence_grid=_grid_index(vocab, [(i, rows[i].output_token_ids) for i in self.occurrence_rows]),
            temperature=float_bits([p.temperature for p in warped]),
            # 1 - top_p is formed in double and rounded to float32, as HF's comparison with a
            # Python scalar does; -1 disables the row.
            top_p_limit=float_bits([1 - p.top_p if p.top_p < 1.0 else -1.0 for p in warped] if self.use_top_p else []),
            min_p=float_bits([p.min_p for p in warped] if self.use_min_p else []),
            repetition=float_bits([p.repetition_penalty for p in params] if self.repetition_rows else []),
            frequency=float_bits([p.frequency_penalty for p in params] if self.occurrence_rows else []),
            presence=float_bits([p.presence_penalty for p in params] if self.occurrence_rows else []),
        )
        needed = bool(self.rand or self.ask or penalised)  # all-greedy plain rows need nothing on the device
        views = stager.stage([host[f.name] for f in fields(RowTensors)] if needed else [])
        if not needed:
            views = [torch.empty(0, dtype=torch.long, device=stager.device)] * len(fields(RowTensors))
        on_device = dict(zip((f.name for f in fields(RowTensors)), views))
        for name in _FLOAT_FIELDS:
            on_device[name] = on_device[name].view(torch.float64).float()
        self.tensors = RowTensors(**on_device)
