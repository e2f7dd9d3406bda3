"""The prefix cache's host-memory tier on the real engine (CPU worker, tiny Llama): a
multi-turn workload whose reused prefixes are four times the device pool. With the tier the
engine computes at most 30% of the prefill tokens it computes without; greedy tokens are
the same with and without; no block is held at the end (either pool), and the caches pass
their integrity checks throughout."""
from __future__ import annotations

import random

import pytest

from quire.cluster import LLM, SamplingParams

BLOCK_SIZE = 16
DEVICE_BLOCKS = 24          # 384 token slots on the device
CONVERSATIONS = 12          # each with a 128-token prefix of its own: 1,536 tokens, 4x the device pool
PREFIX_LEN, USER_LEN, OUTPUT_LEN, TURNS = 128, 8, 8, 5


def conversations(vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(10, vocab) for _ in range(PREFIX_LEN)] for _ in range(CONVERSATIONS)]


def run_turns(llm: LLM, histories: list[list[int]], vocab: int) -> tuple[list[list[int]], dict]:
    """Every conversation takes a turn in order (its full history + a new user message, greedy),
    so by the time one comes back the others have pushed its blocks out of the device pool."""
    rng = random.Random(1)
    params = SamplingParams(temperature=0, max_tokens=OUTPUT_LEN, ignore_eos=True)
    engine = llm.engine
    outputs = []
    for _ in range(TURNS):
        for index, history in enumerate(histories):
            prompt = history + [rng.randrange(10, vocab) for _ in range(USER_LEN)]
            tokens = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
            engine.kv.check_integrity()
            histories[index] = prompt + list(tokens)
            outputs.append(list(tokens))
    kv = engine.kv
    counts = {"prompt_tokens": kv.num_query_tokens, "hit_tokens": kv.num_hit_tokens,
              "host_hit_tokens": kv.num_host_hit_tokens, "offloaded_blocks": kv.num_offloaded_blocks,
              "loaded_blocks": kv.num_loaded_blocks}
    counts["prefill_tokens"] = counts["prompt_tokens"] - counts["hit_tokens"]
    return outputs, counts


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_a_host_tier_four_times_the_device_pool_cuts_prefill_and_changes_no_token(tiny_checkpoint, kv_cache_dtype):
    """With int8 pages the copies move each block's scales with its codes (a lost scale would
    change the tokens). The host pool is shared with swap preemption (swap mode)."""
    path = str(tiny_checkpoint("llama-gqa4"))
    results = {}
    for host_memory in (0, 8 << 20):
        llm = LLM(model=path, dtype="float32", block_size=BLOCK_SIZE, num_kv_blocks=DEVICE_BLOCKS,
                  kv_host_memory=host_memory, kv_cache_dtype=kv_cache_dtype, preemption_mode="swap",
                  swap_space=1 << 20)
        try:
            vocab = min(llm.engine.info.vocab_size, 1000)
            histories = conversations(vocab)
            assert sum(len(h) for h in histories) >= 4 * DEVICE_BLOCKS * BLOCK_SIZE
            results[host_memory] = run_turns(llm, histories, vocab)
            kv = llm.engine.kv
            kv.check_integrity()
            assert kv.num_used_blocks == 0 and not kv.tables and not kv.cpu_tables
            if kv.cpu_pool is not None:
                assert kv.cpu_pool.num_free_blocks == kv.cpu_pool.num_blocks, "a host block is still held"
            assert llm.engine.scheduler.num_unfinished == 0
        finally:
            llm.shutdown()
    (without_tokens, without), (with_tokens, with_tier) = results[0], results[8 << 20]
    assert with_tokens == without_tokens, "the host tier changed a greedy token"
    assert without["host_hit_tokens"] == 0 and with_tier["host_hit_tokens"] > 0 and with_tier["loaded_blocks"] > 0
    ratio = with_tier["prefill_tokens"] / without["prefill_tokens"]
    assert ratio <= 0.30, (ratio, with_tier, without)
