"""Token sampling on tensor-parallel rank 0.

One call samples one token per row of a `[rows, vocab]` logits batch. The pipeline is
raw logits → (logprobs taken here) → penalties → greedy argmax, or temperature, top-k,
top-p, min-p → softmax → exponential race. Processing matches transformers' logits
processors; logprobs describe the raw model distribution, as vLLM does by default.

Host and device meet twice per call at most: the rows' parameters go over in one staging
copy (none for plain greedy rows), and tokens, logprobs and per-row validity come back
in one read (`host_syncs` counts both). Nothing between them waits for the device.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quire.worker.host_sync import HostSyncCounter
from quire.worker.sampling_batch import SamplingBatch, SamplingRow
from quire.worker.seeded_noise import row_seed, seeded_exponentials
from quire.worker.step_inputs import StagingBuffer

__all__ = ["Sampler", "SamplerOutput", "SamplingRow", "row_seed"]

_NO_DISTRIBUTION = "sampling failed: the logits hold no valid distribution (NaN or infinite values)"


@dataclass
class SamplerOutput:
    """Per row: the token, its raw logprob, and the `params.logprobs` best raw logprobs
    (best first); both logprob fields are None where the row did not ask for them. A row
    that could not be sampled has an error (and token 0, a stand-in nobody may use).
    `device_token_ids`, when set, holds the same tokens on the logits' device (for a
    broadcast to other ranks without another copy)."""

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[dict[int, float] | None]
    errors: list[str | None]
    device_token_ids: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @classmethod
    def failed(cls, error: str) -> SamplerOutput:
        return cls([0], [None], [None], [error])

    @classmethod
    def concat(cls, parts: list[SamplerOutput]) -> SamplerOutput:
        return cls(*([item for part in parts for item in getattr(part, name)]
                     for name in ("token_ids", "logprobs", "top_logprobs", "errors")))


class Sampler:
    """Samples next tokens. Never mutates the logits it is given.

    Unseeded rows draw their noise from the sampler's generator (seeded with `seed`); a
    seeded row's noise is a function of its seed and token position alone
    (`seeded_noise`), whatever else is in the batch."""

    def __init__(self, seed: int):
        self.seed = seed
        self.host_syncs = HostSyncCounter()
        # Per device, so noise is drawn and parameters are staged where the logits live.
        self._generators: dict[torch.device, torch.Generator] = {}
        self._stagers: dict[torch.device, StagingBuffer] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[device] = gen
        return self._generators[device]

    def _batch(self, rows: list[SamplingRow], logits: torch.Tensor) -> SamplingBatch:
        """`rows` as a SamplingBatch for `logits` (staged now unless they already are)."""
        if isinstance(rows, SamplingBatch):
            return rows
        device = logits.device
        if device not in self._stagers:
            self._stagers[device] = StagingBuffer(device, self.host_syncs)
        return SamplingBatch(rows, logits.shape[-1], self._stagers[device])

    # -- processing ---------------------------------------------------------------

    def apply_penalties(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Repetition (HF/CTRL, over prompt + output) then frequency and presence
        (OpenAI, over output only). Returns `logits` itself when no row sets a penalty,
        else a new tensor; rows without penalties come back unchanged."""
        batch = self._batch(rows, logits)
        if not batch.repetition_rows and not batch.occurrence_rows:
            return logits
        n, vocab = logits.shape
        t = batch.tensors
        out = logits
        if batch.repetition_rows:
            seen = torch.zeros(n * vocab, dtype=torch.bool, device=logits.device)
            seen.index_fill_(0, t.repetition_grid, True)
            penalty = t.repetition[:, None]
            penalised = torch.where(out < 0, out * penalty, out / penalty)
            out = torch.where(seen.view(n, vocab), penalised, out)
        if batch.occurrence_rows:
            # index_add_, not bincount: bincount sizes its output from the data (a device read).
            counts = torch.zeros(n * vocab, dtype=torch.float32, device=logits.device)
            counts.index_add_(0, t.occurrence_grid, torch.ones_like(t.occurrence_grid, dtype=torch.float32))
            counts = counts.view(n, vocab)
            out = out - (t.frequency[:, None] * counts + t.presence[:, None] * (counts > 0))
        # An extreme penalty (repetition 1e-30) overflows float32; the largest finite value
        # keeps the order the penalty asked for without an inf that would turn softmax to NaN.
        largest = torch.finfo(torch.float32).max
        return out.clamp(-largest, largest)

    @staticmethod
    def apply_warpers(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p of `batch.rand[i]`'s params on row i of `logits`
        (the batch's non-greedy rows, in order), each as transformers' `*LogitsWarper`
        (min_tokens_to_keep=1, applied only when enabled): filtered entries become -inf.
        Returns a new tensor."""
        vocab = logits.shape[1]
        t = batch.tensors
        temperature = t.temperature[:, None]
        x = logits / temperature
        # A tiny temperature scales logits past float32: such rows scale their distance from
        # the row's best instead (the same distribution, softmax being shift-invariant), so the
        # best is 0. Chosen per row on the device: asking which rows overflowed would wait for it.
        overflowed = ~torch.isfinite(x).all(dim=-1, keepdim=True)
        shifted = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
        x = torch.where(overflowed, shifted, x)

        if batch.use_top_k or batch.use_top_p:
            # One ascending sort serves both: masking the values below the top-k
            # threshold keeps the sorted row sorted, and it is exactly the row HF's
            # top-p would sort after HF's top-k.
            sorted_x, order = x.sort(dim=-1)
            if batch.use_top_k:
                threshold = sorted_x.gather(1, (vocab - t.top_k)[:, None])
                x = x.masked_fill(x < threshold, float("-inf"))
                sorted_x = sorted_x.masked_fill(sorted_x < threshold, float("-inf"))
            if batch.use_top_p:
                drop_sorted = sorted_x.softmax(dim=-1).cumsum(dim=-1) <= t.top_p_limit[:, None]
                drop_sorted[:, -1] = False
                drop = torch.empty_like(drop_sorted).scatter_(1, order, drop_sorted)
                x = x.masked_fill(drop, float("-inf"))

        if batch.use_min_p:
            probs = x.softmax(dim=-1)
            top, best = probs.max(dim=-1, keepdim=True)
            drop = probs < t.min_p[:, None] * top
            drop.scatter_(1, best, False)
            x = x.masked_fill(drop, float("-inf"))
        return x

    def process_logits(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Logits as sampling sees them: penalties for every row, then warpers for
        non-greedy rows (greedy rows stay penalised only; their argmax is the token).
        The input is left untouched; the result may be the input when nothing applies."""
        batch = self._batch(rows, logits)
        out = self.apply_penalties(logits, batch)
        if not batch.rand:
            return out
        if len(batch.rand) == len(batch):
            return self.apply_warpers(out, batch)
        rand = batch.tensors.rand
        warped = self.apply_warpers(out.index_select(0, rand), batch)
        return (out.clone() if out is logits else out).index_copy_(0, rand, warped)

    # -- sampling -----------------------------------------------------------------

    def _exponentials(self, batch: SamplingBatch, device: torch.device) -> torch.Tensor:
        """Exp(1) noise `[len(batch.rand), vocab]`: one batched draw from the sampler's
        generator for unseeded rows, one hashed pass for all seeded rows."""
        t, vocab = batch.tensors, batch.vocab
        num_rand = len(batch.rand)
        num_unseeded = num_rand - batch.num_seeded
        if not batch.num_seeded:
            q = torch.empty((num_rand, vocab), dtype=torch.float32, device=device)
            q.exponential_(generator=self._generator(device))
        elif not num_unseeded:
            q = seeded_exponentials(t.seed_keys, vocab)
        else:
            q = torch.empty((num_rand, vocab), dtype=torch.float32, device=device)
            draw = torch.empty((num_unseeded, vocab), dtype=torch.float32, device=device)
            q.index_copy_(0, t.unseeded, draw.exponential_(generator=self._generator(device)))
            q.index_copy_(0, t.seeded, seeded_exponentials(t.seed_keys, vocab))
        # A zero draw would turn a filtered token's 0/0 into NaN and win the argmax.
        return q.clamp_min_(torch.finfo(torch.float32).tiny)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """Sample one token per row of `logits` `[len(rows), vocab]` (any device).

        A row's failure is its own: when the batch raises, each row is sampled again on its
        own, and a row that still fails (or whose processed logits hold no distribution) gets
        an error in the output while the other rows get their tokens."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits of shape {tuple(logits.shape)} for {len(rows)} rows")
        if not rows:
            return SamplerOutput([], [], [], [])
        try:
            return self._sample(logits, rows)
        except Exception as error:  # noqa: BLE001 - attributed to its row below, or reported as that row's
            if len(rows) == 1:
                return SamplerOutput.failed(f"sampling failed: {type(error).__name__}: {error}")
        return SamplerOutput.concat([self(logits[i:i + 1], [row]) for i, row in enumerate(rows)])

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        n = logits.shape[0]
        raw = logits.float()
        batch = self._batch(rows, raw)
        t = batch.tensors
        processed = self.process_logits(raw, batch)
        # NaN anywhere, +inf, or nothing finite: no distribution to sample from (and argmax
        # would pick an arbitrary token). Such rows fail, flagged on the device and read back
        # with the tokens; the others are sampled as usual. A row's max propagates NaN, so it
        # is finite exactly when the row is valid: one pass over the logits finds both the
        # validity and, for greedy rows, the token (max's index is argmax's: the first best).
        best, tokens = processed.max(dim=-1)
        invalid = ~torch.isfinite(best)
        if batch.rand:
            probs = (processed if not batch.greedy else processed.index_select(0, t.rand)).softmax(dim=-1)
            # Exponential race: argmax(p / q) with q ~ Exp(1) is a draw from p.
            raced = (probs / self._exponentials(batch, logits.device)).argmax(dim=-1)
            if not batch.greedy:
                tokens = raced
            else:
                tokens = tokens.index_copy_(0, t.rand, raced)
        tokens = tokens.masked_fill(invalid, 0)
        return self._read_back(batch, raw, tokens, invalid)

    def _read_back(self, batch: SamplingBatch, raw: torch.Tensor, tokens: torch.Tensor,
                   invalid: torch.Tensor) -> SamplerOutput:
        """Tokens, validity flags and the asked-for logprobs packed into one float64 tensor
        (ids are exact in float64) and read back once; unpacked into the output."""
        n, top_n, ask = len(batch), batch.top_n, batch.ask
        columns = [tokens[:, None].double(), invalid[:, None].double()]
        if ask:
            a = batch.tensors.ask
            lp = torch.log_softmax(raw if len(ask) == n else raw.index_select(0, a), dim=-1)
            chosen = lp.gather(1, (tokens if len(ask) == n else tokens.index_select(0, a))[:, None])
            top_v, top_i = lp.topk(top_n, dim=-1) if top_n > 0 else (lp[:, :0], lp[:, :0].long())
            asked = torch.cat([chosen.double(), top_v.double(), top_i.double()], dim=1)
            if len(ask) < n:
                asked = torch.zeros((n, asked.shape[1]), dtype=torch.float64, device=raw.device).index_copy_(0, a, asked)
            columns.append(asked)
        packed = self.host_syncs.read_back(torch.cat(columns, dim=1))

        token_ids = [int(row[0]) for row in packed]
        errors: list[str | None] = [_NO_DISTRIBUTION if row[1] else None for row in packed]
        logprobs: list[float | None] = [None] * n
        top_logprobs: list[dict[int, float] | None] = [None] * n
        for i in ask:
            if errors[i] is None:
                want, row = batch[i].params.logprobs, packed[i]
                logprobs[i] = row[2]
                top_logprobs[i] = dict(zip((int(v) for v in row[3 + top_n:3 + top_n + want]), row[3:3 + want]))
        return SamplerOutput(token_ids, logprobs, top_logprobs, errors, device_token_ids=tokens)
