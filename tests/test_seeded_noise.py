"""Seeded noise is a function of (seed, position, vocab index) alone, drawn in one pass;
the device block table follows the plan's deltas."""
from __future__ import annotations

import torch

from quire.protos.step import SamplingParams
from quire.worker.block_table import DeviceBlockTable
from quire.worker.sampler import Sampler, SamplingRow
from quire.worker.seeded_noise import _splitmix64, as_int64, row_seed, seeded_exponentials

MASK64 = (1 << 64) - 1


def test_the_noise_is_splitmix64_of_the_row_key_and_vocab_index():
    key = row_seed(2**64 - 1, 7)
    words = []
    for v in range(5):
        u = ((_splitmix64((key + v * 0x9E3779B97F4A7C15) & MASK64) >> 11) + 1) * 2.0 ** -53
        words.append(-torch.tensor(u, dtype=torch.float64).log().float().item())
    noise = seeded_exponentials(torch.tensor([as_int64(key)]), 5)
    assert noise[0].tolist() == words


def test_each_row_depends_on_its_key_alone():
    keys = torch.tensor([as_int64(row_seed(s, p)) for s, p in [(1, 0), (1, 1), (2, 0), (2**63, 5)]])
    together = seeded_exponentials(keys, 300)
    for i in range(len(keys)):
        assert torch.equal(seeded_exponentials(keys[i:i + 1], 300)[0], together[i])
    assert len({tuple(row.tolist()) for row in together}) == 4
    big = seeded_exponentials(keys[:1], 100_000)[0]
    assert abs(big.mean().item() - 1) < 0.02 and abs(big.std().item() - 1) < 0.02  # Exp(1)


def _generate(sampler: Sampler, logits: torch.Tensor, seed: int, steps: int, company: int) -> list[int]:
    """Tokens of one seeded request sampled `steps` times, beside `company` other rows."""
    out: list[int] = []
    for step in range(steps):
        others = [SamplingRow(SamplingParams(seed=100 + k if k % 2 else None, top_p=0.9), [1], [3] * step)
                  for k in range(company)]
        rows = others[:step % (company + 1)] + [SamplingRow(SamplingParams(seed=seed, top_k=50), [1], list(out))]
        rows += others[step % (company + 1):]
        mine = step % (company + 1)
        out.append(sampler(logits.expand(len(rows), -1), rows).token_ids[mine])
    return out


def test_a_seeded_request_alone_or_batched_gets_the_same_tokens_in_every_run():
    logits = torch.randn(1, 500, generator=torch.Generator().manual_seed(0))
    alone = _generate(Sampler(seed=1), logits, seed=42, steps=10, company=0)
    batched = _generate(Sampler(seed=2), logits, seed=42, steps=10, company=5)
    assert alone == batched == _generate(Sampler(seed=3), logits, seed=42, steps=10, company=2)
    assert _generate(Sampler(seed=1), logits, seed=43, steps=10, company=0) != alone
    assert len(set(alone)) > 1


def test_block_table_follows_deltas_and_grows():
    table = DeviceBlockTable(torch.device("cpu"), rows=2, width=2)
    expected: dict[int, list[int]] = {}

    def flush():
        index, values = table.take_deltas()
        table.apply_deltas(torch.from_numpy(index), torch.from_numpy(values))
        for row in range(table.table.shape[0]):
            ids = expected.get(row, [])
            assert table.table[row].tolist() == ids + [0] * (table.width - len(ids))

    a, b, c = table.acquire(), table.acquire(), table.acquire()  # the third grows the rows
    table.assign(a, [5, 6, 7]), table.assign(b, [9]), table.assign(c, [1, 2])
    expected.update({a: [5, 6, 7], b: [9], c: [1, 2]})
    flush()
    table.extend(b, [10, 11, 12, 13])
    table.assign(a, [8])
    table.release(c)
    expected[b] += [10, 11, 12, 13]
    expected[a] = [8]
    del expected[c]
    flush()
    d = table.acquire()
    assert d == c  # reused, zeroed
    table.assign(d, [4])
    expected[d] = [4]
    flush()
    rows = torch.tensor([b, a])
    assert table.gather(rows, 3).tolist() == [[9, 10, 11], [8, 0, 0]]
