"""Sampler: greedy, seeding, HF-equivalent processing, penalties, logprobs, statistics."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from quire.protos.step import SamplingParams
from quire.worker.sampler import Sampler, SamplingRow

VOCAB = 64


def row(prompt=(1, 2, 3), output=(), **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), list(prompt), list(output))


def random_logits(n: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def assert_same_logits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Values close and the filtered (-inf) sets identical."""
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected))
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def hf_warp(logits_row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """HF's warpers in the order generation adds them, each only when enabled."""
    x = logits_row[None]
    ids = torch.zeros(1, 1, dtype=torch.long)
    x = TemperatureLogitsWarper(params.temperature)(ids, x)
    if params.top_k > 0:
        x = TopKLogitsWarper(params.top_k)(ids, x)
    if params.top_p < 1.0:
        x = TopPLogitsWarper(params.top_p)(ids, x)
    if params.min_p > 0:
        x = MinPLogitsWarper(params.min_p)(ids, x)
    return x[0]


# -- greedy --------------------------------------------------------------------------

def test_temperature_zero_and_top_k_one_are_argmax():
    logits = random_logits(6)
    rows = [row(temperature=0.0), row(top_k=1), row(temperature=0.0, seed=3),
            row(top_k=1, temperature=2.0, top_p=0.5), row(temperature=0.0), row(top_k=1, seed=9)]
    out = Sampler(seed=0)(logits, rows)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 6 and out.top_logprobs == [None] * 6


@pytest.mark.parametrize("mixed", [False, True], ids=["all-greedy", "greedy-and-random"])
def test_one_pass_finds_tokens_ties_and_invalid_rows(mixed):
    """Greedy tokens come from one max over each row: the first of tied best tokens (as
    argmax), and rows holding NaN, +inf or nothing finite fail while a row with some -inf
    entries is sampled as usual."""
    logits = random_logits(6)
    logits[0, [5, 9, 40]] = 50.0  # a three-way tie: the first wins
    logits[1, 7] = float("nan")
    logits[2, 3] = float("inf")
    logits[3] = float("-inf")
    logits[4, :30] = float("-inf")
    rows = [row(temperature=0.0) for _ in range(6)]
    if mixed:
        rows[5] = row(temperature=1.0, seed=1)
    out = Sampler(seed=0)(logits, rows)
    assert [e is not None for e in out.errors] == [False, True, True, True, False, False]
    assert out.token_ids[0] == 5 and out.token_ids[4] == int(logits[4].argmax())
    if not mixed:
        assert out.token_ids[5] == int(logits[5].argmax())


# -- seeding -------------------------------------------------------------------------

def test_same_seed_same_tokens_regardless_of_batch():
    flat = torch.zeros(1, 1000)
    sampler_a, sampler_b = Sampler(seed=1), Sampler(seed=2)
    output_a: list[int] = []
    output_b: list[int] = []
    for step in range(8):
        alone = sampler_a(flat, [row(output=output_a, seed=42)]).token_ids[0]
        # Same request at another batch position, beside unseeded and other-seeded rows.
        others = [row(), row(seed=7, output=[5] * step), row(temperature=0.0)]
        pos = step % 4
        batch = others[:pos] + [row(output=output_b, seed=42)] + others[pos:]
        in_batch = sampler_b(flat.expand(len(batch), -1), batch).token_ids[pos]
        assert alone == in_batch
        # Preemption recomputes with the same outputs: the draw repeats.
        assert sampler_b(flat, [row(output=output_a, seed=42)]).token_ids[0] == alone
        output_a.append(alone)
        output_b.append(in_batch)
    assert len(set(output_a)) > 1  # the noise moves on with each step


def test_different_seeds_differ():
    flat = torch.zeros(1, 1000)
    sampler = Sampler(seed=0)

    def run(seed: int) -> list[int]:
        out: list[int] = []
        for _ in range(10):
            out.append(sampler(flat, [row(output=out, seed=seed)]).token_ids[0])
        return out

    assert run(1) != run(2)
    assert run(1) == run(1)


def test_unseeded_rows_follow_the_sampler_seed():
    flat = torch.zeros(5, 1000)
    rows = [row() for _ in range(5)]
    assert Sampler(seed=3)(flat, rows).token_ids == Sampler(seed=3)(flat, rows).token_ids
    assert Sampler(seed=3)(flat, rows).token_ids != Sampler(seed=4)(flat, rows).token_ids


# -- processing vs transformers ------------------------------------------------------

WARPER_CASES = [
    dict(temperature=0.7),
    dict(temperature=1.3),
    dict(top_k=5),
    dict(top_k=VOCAB + 10),
    dict(top_p=0.9),
    dict(top_p=0.3),
    dict(min_p=0.05),
    dict(min_p=0.5),
    dict(temperature=0.8, top_k=20, top_p=0.8, min_p=0.02),
    dict(temperature=1.5, top_k=3, top_p=0.95, min_p=0.3),
]


@pytest.mark.parametrize("case", range(len(WARPER_CASES)))
def test_warpers_match_hf(case):
    params = WARPER_CASES[case]
    logits = random_logits(4, seed=case)
    rows = [row(**params) for _ in range(4)]
    processed = Sampler(seed=0).process_logits(logits, rows)
    for i in range(4):
        assert_same_logits(processed[i], hf_warp(logits[i], rows[i].params))


def test_mixed_batch_matches_hf_per_row():
    logits = random_logits(7, seed=11)
    rows = [row(temperature=0.9, top_k=10), row(temperature=0.0), row(top_p=0.6),
            row(min_p=0.1, temperature=0.5), row(top_k=1), row(), row(top_k=4, top_p=0.5, min_p=0.2)]
    processed = Sampler(seed=0).process_logits(logits, rows)
    for i, r in enumerate(rows):
        expected = logits[i] if r.params.greedy else hf_warp(logits[i], r.params)
        assert_same_logits(processed[i], expected)


# -- penalties -----------------------------------------------------------------------

def test_repetition_penalty_matches_hf():
    logits = random_logits(3, seed=5)
    rows = [row(prompt=[1, 4, 4, 9], output=[9, 30], repetition_penalty=1.3),
            row(prompt=[2, 3], output=[], repetition_penalty=0.7),
            row(prompt=[1, 4], output=[5])]  # no penalty: untouched
    processed = Sampler(seed=0).apply_penalties(logits, rows)
    for i, r in enumerate(rows[:2]):
        ids = torch.tensor([r.prompt_token_ids + r.output_token_ids])
        expected = RepetitionPenaltyLogitsProcessor(r.params.repetition_penalty)(ids, logits[i:i + 1].clone())
        assert torch.equal(processed[i], expected[0])
    assert torch.equal(processed[2], logits[2])


def test_frequency_and_presence_penalties_openai_formula():
    logits = random_logits(3, seed=6)
    rows = [row(prompt=[7, 8], output=[3, 3, 3, 10, 12, 10], frequency_penalty=0.5, presence_penalty=0.25),
            row(prompt=[7], output=[1, 1, 2], frequency_penalty=-0.4),
            row(prompt=[3], output=[3, 4], presence_penalty=1.5, repetition_penalty=1.2)]
    processed = Sampler(seed=0).apply_penalties(logits, rows)
    expected = logits.clone()
    for i, r in enumerate(rows):
        p = r.params
        if p.repetition_penalty != 1.0:
            for t in set(r.prompt_token_ids + r.output_token_ids):
                v = expected[i, t]
                expected[i, t] = v * p.repetition_penalty if v < 0 else v / p.repetition_penalty
        for t in set(r.output_token_ids):
            count = r.output_token_ids.count(t)
            expected[i, t] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
    torch.testing.assert_close(processed, expected)
    # Prompt-only tokens get no frequency/presence penalty.
    assert processed[0, 7] == logits[0, 7] and processed[1, 7] == logits[1, 7]


def test_no_penalty_rows_skip_work():
    logits = random_logits(2)
    assert Sampler(seed=0).apply_penalties(logits, [row(), row(temperature=0.0)]) is logits


def test_greedy_uses_penalised_logits():
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0]])
    out = Sampler(seed=0)(logits, [row(prompt=[], output=[0, 0], temperature=0.0, frequency_penalty=1.0)])
    assert out.token_ids == [1]


# -- logprobs ------------------------------------------------------------------------

def test_logprobs_are_raw_log_softmax():
    logits = random_logits(4, seed=8)
    rows = [row(logprobs=5, temperature=0.5, repetition_penalty=1.5, output=[1, 2]),
            row(logprobs=0, temperature=0.0, frequency_penalty=2.0, output=[0]),
            row(),
            row(logprobs=20, seed=4, top_k=3)]
    out = Sampler(seed=0)(logits, rows)
    expected = torch.log_softmax(logits, dim=-1)
    for i, r in enumerate(rows):
        n = r.params.logprobs
        if n is None:
            assert out.logprobs[i] is None and out.top_logprobs[i] is None
            continue
        assert out.logprobs[i] == pytest.approx(expected[i, out.token_ids[i]].item(), abs=1e-6)
        top = out.top_logprobs[i]
        assert len(top) == n
        values, ids = expected[i].topk(n)
        assert list(top) == ids.tolist()  # best first
        assert list(top.values()) == pytest.approx(values.tolist(), abs=1e-6)


# -- statistics ----------------------------------------------------------------------

@pytest.mark.parametrize("seeded", [False, True])
def test_sampling_frequencies_match_probabilities(seeded):
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 4000
    logits = probs.log().expand(n, -1)
    rows = [row(seed=s if seeded else None) for s in range(n)]
    tokens = torch.tensor(Sampler(seed=1234)(logits, rows).token_ids)
    freqs = torch.bincount(tokens, minlength=4).float() / n
    torch.testing.assert_close(freqs, probs, atol=0.03, rtol=0)


def test_filtered_tokens_are_never_sampled():
    logits = random_logits(1, seed=9).expand(500, -1)
    rows = [row(top_k=3) for _ in range(500)]
    tokens = set(Sampler(seed=0)(logits, rows).token_ids)
    assert tokens <= set(logits[0].topk(3).indices.tolist())
    assert len(tokens) > 1


# -- hygiene -------------------------------------------------------------------------

def test_does_not_mutate_logits():
    logits = random_logits(5, seed=10)
    before = logits.clone()
    rows = [row(temperature=0.0, repetition_penalty=1.4, output=[1]),
            row(top_k=5, top_p=0.8, min_p=0.1, frequency_penalty=1.0, presence_penalty=1.0, output=[2, 2]),
            row(seed=3, logprobs=3),
            row(temperature=0.3),
            row(top_k=1)]
    Sampler(seed=0)(logits, rows)
    Sampler(seed=0).process_logits(logits, rows)
    assert torch.equal(logits, before)


def test_empty_batch_and_shape_check():
    out = Sampler(seed=0)(torch.zeros(0, VOCAB), [])
    assert out.token_ids == [] and out.logprobs == [] and out.top_logprobs == []
    with pytest.raises(ValueError):
        Sampler(seed=0)(torch.zeros(2, VOCAB), [row()])
