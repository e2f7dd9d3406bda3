"""Token sampling on tensor-parallel rank 0.

One call samples one token per row of a `[rows, vocab]` logits batch. The pipeline is
raw logits → (logprobs taken here) → penalties → greedy argmax, or temperature, top-k,
top-p, min-p → softmax → exponential race. Processing matches transformers' logits
processors; logprobs describe the raw model distribution, as vLLM does by default.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from quire.protos.step import SamplingSpec

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_seed(seed: int, step: int) -> int:
    """Generator seed for output token number `step` of a request seeded with `seed`.

    A function of (seed, step) only, so a seeded request draws the same noise whatever
    else is in the batch and after recompute preemption (which keeps its outputs).
    """
    return _splitmix64(_splitmix64(seed) ^ step)


@dataclass
class SamplingRow:
    """One row of a batch: its request's sampling spec (anything with SamplingSpec's fields and
    `greedy`; a SamplingParams serves too) and its tokens so far, for penalties and seeds."""

    params: SamplingSpec
    prompt_token_ids: list[int]
    output_token_ids: list[int]


@dataclass
class SamplerOutput:
    """Per row: the token, its raw logprob, and the `params.logprobs` best raw logprobs
    (best first); both logprob fields are None where the row did not ask for them. A row
    that could not be sampled has an error (and token 0, a stand-in nobody may use)."""

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[dict[int, float] | None]
    errors: list[str | None]

    @classmethod
    def failed(cls, error: str) -> SamplerOutput:
        return cls([0], [None], [None], [error])

    @classmethod
    def concat(cls, parts: list[SamplerOutput]) -> SamplerOutput:
        return cls(*([item for part in parts for item in getattr(part, name)]
                     for name in ("token_ids", "logprobs", "top_logprobs", "errors")))


def _grid_index(vocab: int, per_row: list[tuple[int, list[int]]], device: torch.device) -> torch.Tensor:
    """Flat indices `row * vocab + token` into a `[rows, vocab]` grid; ids outside the
    vocab are dropped (an embedding may be larger than the LM head, as HF allows)."""
    lengths = torch.tensor([len(ids) for _, ids in per_row], dtype=torch.long)
    row_ids = torch.repeat_interleave(torch.tensor([r for r, _ in per_row], dtype=torch.long), lengths)
    ids = torch.tensor(list(itertools.chain.from_iterable(ids for _, ids in per_row)), dtype=torch.long)
    keep = (ids >= 0) & (ids < vocab)
    return (row_ids * vocab + ids)[keep].to(device)


class Sampler:
    """Samples next tokens. Never mutates the logits it is given."""

    def __init__(self, seed: int):
        self.seed = seed
        # One generator per device so unseeded noise is drawn where the logits live.
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[device] = gen
        return self._generators[device]

    # -- processing ---------------------------------------------------------------

    def apply_penalties(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Repetition (HF/CTRL, over prompt + output) then frequency and presence
        (OpenAI, over output only). Returns `logits` itself when no row sets a penalty,
        else a new tensor; rows without penalties come back unchanged."""
        rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
        occ = [i for i, r in enumerate(rows) if r.params.frequency_penalty != 0 or r.params.presence_penalty != 0]
        if not rep and not occ:
            return logits
        n, vocab = logits.shape
        dev = logits.device
        out = logits
        if rep:
            flat = _grid_index(vocab, [(i, rows[i].prompt_token_ids + rows[i].output_token_ids) for i in rep], dev)
            seen = torch.zeros(n * vocab, dtype=torch.bool, device=dev)
            seen[flat] = True
            penalty = torch.tensor([r.params.repetition_penalty for r in rows], dtype=torch.float32, device=dev)
            penalty = penalty[:, None]
            penalised = torch.where(out < 0, out * penalty, out / penalty)
            out = torch.where(seen.view(n, vocab), penalised, out)
        if occ:
            flat = _grid_index(vocab, [(i, rows[i].output_token_ids) for i in occ], dev)
            counts = torch.bincount(flat, minlength=n * vocab).view(n, vocab).to(torch.float32)
            freq = torch.tensor([r.params.frequency_penalty for r in rows], dtype=torch.float32, device=dev)
            pres = torch.tensor([r.params.presence_penalty for r in rows], dtype=torch.float32, device=dev)
            out = out - (freq[:, None] * counts + pres[:, None] * (counts > 0))
        # An extreme penalty (repetition 1e-30) overflows float32; the largest finite value
        # keeps the order the penalty asked for without an inf that would turn softmax to NaN.
        largest = torch.finfo(torch.float32).max
        return out.clamp(-largest, largest)

    @staticmethod
    def apply_warpers(logits: torch.Tensor, params: list[SamplingSpec]) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p with `params[i]` on row i, each as
        transformers' `*LogitsWarper` (min_tokens_to_keep=1, applied only when enabled):
        filtered entries become -inf. Rows must not be greedy. Returns a new tensor."""
        n, vocab = logits.shape
        dev = logits.device
        f32 = dict(dtype=torch.float32, device=dev)
        temperature = torch.tensor([p.temperature for p in params], **f32)[:, None]
        x = logits / temperature
        overflowed = ~torch.isfinite(x).all(dim=-1)
        if overflowed.any():
            # A tiny temperature scales logits past float32: scale their distance from the row's
            # best instead (the same distribution, softmax being shift-invariant), so the best is 0.
            shifted = logits[overflowed] - logits[overflowed].max(dim=-1, keepdim=True).values
            x[overflowed] = shifted / temperature[overflowed]

        use_k = any(0 < p.top_k < vocab for p in params)
        use_p = any(p.top_p < 1.0 for p in params)
        if use_k or use_p:
            # One ascending sort serves both: masking the values below the top-k
            # threshold keeps the sorted row sorted, and it is exactly the row HF's
            # top-p would sort after HF's top-k.
            sorted_x, order = x.sort(dim=-1)
            if use_k:
                k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], device=dev)
                threshold = sorted_x.gather(1, (vocab - k)[:, None])
                x = x.masked_fill(x < threshold, float("-inf"))
                sorted_x = sorted_x.masked_fill(sorted_x < threshold, float("-inf"))
            if use_p:
                # 1 - top_p is formed in double and rounded to float32, as HF's
                # comparison with a Python scalar does; -1 disables the row.
                limit = torch.tensor([1 - p.top_p if p.top_p < 1.0 else -1.0 for p in params], **f32)
                drop_sorted = sorted_x.softmax(dim=-1).cumsum(dim=-1) <= limit[:, None]
                drop_sorted[:, -1] = False
                drop = torch.empty_like(drop_sorted).scatter_(1, order, drop_sorted)
                x = x.masked_fill(drop, float("-inf"))

        if any(p.min_p > 0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], **f32)
            probs = x.softmax(dim=-1)
            top, best = probs.max(dim=-1, keepdim=True)
            drop = probs < min_p[:, None] * top
            drop.scatter_(1, best, False)
            x = x.masked_fill(drop, float("-inf"))
        return x

    def process_logits(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Logits as sampling sees them: penalties for every row, then warpers for
        non-greedy rows (greedy rows stay penalised only; their argmax is the token).
        The input is left untouched; the result may be the input when nothing applies."""
        out = self.apply_penalties(logits, rows)
        rand = [i for i, r in enumerate(rows) if not r.params.greedy]
        if len(rand) == len(rows):
            return self.apply_warpers(out, [r.params for r in rows]) if rows else out
        if rand:
            idx = torch.tensor(rand, device=logits.device)
            out = out.clone() if out is logits else out
            out[idx] = self.apply_warpers(out[idx], [rows[i].params for i in rand])
        return out

    # -- sampling -----------------------------------------------------------------

    def _exponentials(self, rows: list[SamplingRow], vocab: int, device: torch.device) -> torch.Tensor:
        """Exp(1) noise `[len(rows), vocab]`: one batched draw from the sampler's
        generator for unseeded rows, a per-(seed, step) generator for each seeded row."""
        unseeded = [j for j, r in enumerate(rows) if r.params.seed is None]
        q = torch.empty((len(rows), vocab), dtype=torch.float32, device=device)
        if unseeded:
            draw = torch.empty((len(unseeded), vocab), dtype=torch.float32, device=device)
            draw.exponential_(generator=self._generator(device))
            if len(unseeded) == len(rows):
                q = draw
            else:
                q[torch.tensor(unseeded, device=device)] = draw
        for j, r in enumerate(rows):
            if r.params.seed is not None:
                gen = torch.Generator(device=device)
                gen.manual_seed(row_seed(r.params.seed, len(r.output_token_ids)))
                q[j].exponential_(generator=gen)
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
        n, vocab = logits.shape
        dev = logits.device
        raw = logits.float()
        processed = self.process_logits(raw, rows)
        # NaN anywhere, +inf, or nothing finite: no distribution to sample from (and argmax
        # would pick an arbitrary token). Such rows fail; the others are sampled as usual.
        invalid = (~((processed < float("inf")).all(dim=-1) & (processed > float("-inf")).any(dim=-1))).tolist()

        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        rand = [i for i, r in enumerate(rows) if not r.params.greedy]
        if not rand:
            tokens = processed.argmax(dim=-1)
        else:
            tokens = torch.empty(n, dtype=torch.long, device=dev)
            if greedy:
                g = torch.tensor(greedy, device=dev)
                tokens[g] = processed[g].argmax(dim=-1)
            r_idx = torch.tensor(rand, device=dev)
            probs = (processed if not greedy else processed[r_idx]).softmax(dim=-1)
            # Exponential race: argmax(p / q) with q ~ Exp(1) is a draw from p.
            q = self._exponentials([rows[i] for i in rand], vocab, dev)
            tokens[r_idx] = (probs / q).argmax(dim=-1)
        token_ids = tokens.tolist()

        logprobs: list[float | None] = [None] * n
        top_logprobs: list[dict[int, float] | None] = [None] * n
        ask = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if ask:
            a = torch.tensor(ask, device=dev)
            lp = torch.log_softmax(raw if len(ask) == n else raw[a], dim=-1)
            chosen = lp.gather(1, tokens[a][:, None]).squeeze(1).tolist()
            top_n = min(max(rows[i].params.logprobs for i in ask), vocab)
            top_v, top_i = (lp.topk(top_n, dim=-1) if top_n > 0 else (lp[:, :0], lp[:, :0].long()))
            top_v, top_i = top_v.tolist(), top_i.tolist()
            for j, i in enumerate(ask):
                want = rows[i].params.logprobs
                logprobs[i] = chosen[j]
                top_logprobs[i] = dict(zip(top_i[j][:want], top_v[j][:want]))
        errors: list[str | None] = [None] * n
        for i in (i for i, bad in enumerate(invalid) if bad):
            token_ids[i], logprobs[i], top_logprobs[i] = 0, None, None
            errors[i] = "sampling failed: the logits hold no valid distribution (NaN or infinite values)"
        return SamplerOutput(token_ids, logprobs, top_logprobs, errors)
