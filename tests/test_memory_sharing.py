"""Memory sharing on the real engine, checked against HF transformers token for token: prefix
caching on and off, chunked prefill at several budgets, recompute and swap preemption,
parallel samples that fork one prompt's blocks (copy-on-write), and cache salts."""
import pytest
import torch
import transformers

from quire.cluster import LLM, SamplingParams

NEW_TOKENS = 24
SYSTEM = [(13 * j) % 1900 + 3 for j in range(37)]  # a shared "system prompt" spanning blocks unevenly
PROMPTS = ([SYSTEM + [(7 * i + j) % 1900 + 3 for j in range(1 + 3 * i)] for i in range(6)]
           + [SYSTEM, SYSTEM + [5, 6, 7]])  # the prefix alone, and the prefix plus a short tail
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    path = tiny_checkpoint("llama-gqa4")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        tokens = [model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]
    return path, tokens


SETTINGS = {
    "no-prefix-caching": dict(enable_prefix_caching=False),
    "prefix-caching": dict(),
    "chunked-16": dict(max_num_batched_tokens=16),
    "chunked-24-blocks-4": dict(max_num_batched_tokens=24, block_size=4),
    "chunked-64-no-caching": dict(max_num_batched_tokens=64, enable_prefix_caching=False),
    "recompute-preemption": dict(num_kv_blocks=12, block_size=8, max_num_batched_tokens=32),
    "swap-preemption": dict(num_kv_blocks=12, block_size=8, max_num_batched_tokens=32, preemption_mode="swap",
                            swap_space=1 << 20),
    "swap-chunked-no-caching": dict(num_kv_blocks=12, block_size=8, max_num_batched_tokens=16,
                                    preemption_mode="swap", swap_space=1 << 20, enable_prefix_caching=False),
}
# Asynchronous scheduling (each plan made while the step before runs, naming its tokens by
# placeholder) under the same pressures; in-process, where it is off by default.
SETTINGS.update({f"async-{name}": dict(SETTINGS[name], async_scheduling=True)
                 for name in ("prefix-caching", "chunked-24-blocks-4", "recompute-preemption", "swap-preemption")})


@pytest.mark.parametrize("name", list(SETTINGS))
def test_greedy_outputs_match_hf_under_every_memory_setting(name, reference):
    path, hf_tokens = reference
    settings = {"num_kv_blocks": 128, **SETTINGS[name]}
    llm = LLM(model=str(path), dtype="float32", **settings)
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for i, output in enumerate(outputs):
        assert output.outputs[0].token_ids == hf_tokens[i], f"{name}: prompt {i} diverged from HF"
    engine = llm.engine
    if settings.get("enable_prefix_caching", True):
        assert engine.kv.num_hit_tokens >= 32 * (len(PROMPTS) - 1) or engine.scheduler.num_preemptions, \
            "every prompt after the first shares the system prompt's full blocks"
    else:
        assert engine.kv.num_hit_tokens == 0
    if "preemption" in name or "swap" in name:
        assert engine.scheduler.num_preemptions > 0, "the tiny KV budget was meant to force preemption"
    if "swap" in name:
        assert engine.scheduler.num_swapped_out > 0 and engine.kv.cpu_pool.num_free_blocks == engine.kv.cpu_pool.num_blocks
    engine.scheduler.check_integrity()
    assert engine.kv.num_used_blocks == 0
    llm.shutdown()


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_parallel_samples_fork_the_prompt_and_copy_on_write(reference, async_scheduling):
    path, hf_tokens = reference
    llm = LLM(model=str(path), dtype="float32", num_kv_blocks=64, block_size=8, async_scheduling=async_scheduling)
    copies = []
    real_schedule = llm.engine.scheduler.schedule

    def schedule():
        plan = real_schedule()
        copies.extend(plan.block_copies)
        return plan

    llm.engine.scheduler.schedule = schedule
    prompt = PROMPTS[2]  # 44 tokens: the last block is half full, so forks must copy it
    greedy = llm.generate([prompt], SamplingParams(n=4, temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True),
                          use_tqdm=False)[0]
    assert [c.index for c in greedy.outputs] == [0, 1, 2, 3]
    assert all(c.token_ids == hf_tokens[2] for c in greedy.outputs), "a fork's output must equal the leader's"
    assert len(copies) == 3, "each of the three forks copies the shared partial block once"
    # Seeded samples of a fork equal the same seeds run alone: forking changes no sample.
    sampled = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True),
                           use_tqdm=False)[0]
    alone = LLM(model=str(path), dtype="float32", num_kv_blocks=64, block_size=8, enable_prefix_caching=False)
    for index, completion in enumerate(sampled.outputs):
        single = alone.generate([prompt], SamplingParams(temperature=1.0, seed=11 + index, max_tokens=12,
                                                         ignore_eos=True), use_tqdm=False)[0]
        assert completion.token_ids == single.outputs[0].token_ids, f"sample {index}"
    assert len({tuple(c.token_ids) for c in sampled.outputs}) == 3
    llm.engine.scheduler.check_integrity()
    assert llm.engine.kv.num_used_blocks == 0
    llm.shutdown()
    alone.shutdown()


def test_cache_salt_decides_who_shares_a_prefix(reference):
    path, _ = reference
    llm = LLM(model=str(path), dtype="float32", num_kv_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=2)
    kv = llm.engine.kv
    llm.generate([PROMPTS[0]], params, use_tqdm=False, cache_salt="tenant-a")
    assert kv.num_hit_tokens == 0
    llm.generate([PROMPTS[0]], params, use_tqdm=False, cache_salt="tenant-b")
    assert kv.num_hit_tokens == 0, "another tenant's salt must not reach tenant a's blocks"
    llm.generate([PROMPTS[0]], params, use_tqdm=False)
    assert kv.num_hit_tokens == 0, "nor may an unsalted request"
    llm.generate([PROMPTS[0]], params, use_tqdm=False, cache_salt="tenant-a")
    assert kv.num_hit_tokens == 32, "the same salt hits (two full blocks of 16)"
    with pytest.raises(ValueError, match="cache_salt"):
        llm.generate([PROMPTS[0]], params, use_tqdm=False, cache_salt="")
    llm.shutdown()
