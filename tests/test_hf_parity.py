"""Parity with Hugging Face transformers, the peer nobody here wrote: greedy token ids
identical to `generate`, prompt logits within 1e-4 in fp32, on tiny checkpoints of each
supported family; unchanged under preemption and chunked prefill."""
import pytest
import torch
import transformers

from conftest import TINY_CONFIGS
from quire.cluster import LLM, SamplingParams

NEW_TOKENS = 32
# A ragged batch: 8 prompts of 3..52 tokens (ids away from the special ones).
PROMPTS = [[(17 * i + 5 * j) % 1900 + 3 for j in range(3 + 7 * i)] for i in range(8)]
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def hf_reference(tiny_checkpoint):
    """Per config: HF greedy continuations and prompt logits, computed once."""
    cache = {}

    def get(name):
        if name not in cache:
            path = tiny_checkpoint(name)
            model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            tokens, logits = [], []
            with torch.no_grad():
                for prompt in PROMPTS:
                    ids = torch.tensor([prompt])
                    out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                         pad_token_id=0)
                    tokens.append(out[0, len(prompt):].tolist())
                    logits.append(model(ids).logits[0].float())
            cache[name] = (path, tokens, logits)
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_greedy_tokens_and_prompt_logits_match_hf(name, hf_reference):
    path, hf_tokens, hf_logits = hf_reference(name)
    llm = LLM(model=str(path), dtype="float32", num_kv_blocks=128)
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for i, output in enumerate(outputs):
        assert output.outputs[0].token_ids == hf_tokens[i], f"{name}: prompt {i} diverged from HF"
        assert output.outputs[0].finish_reason == "length"
    runner = llm.engine.executor.worker.runner
    for i, logits in enumerate(runner.prompt_logits(PROMPTS)):
        torch.testing.assert_close(logits, hf_logits[i], atol=1e-4, rtol=0, msg=f"{name}: prompt {i} logits")
    assert llm.engine.kv.num_used_blocks == 0


@pytest.mark.parametrize("name", ["llama-gqa4", "qwen2-bias"])
@pytest.mark.parametrize("settings", [
    dict(num_kv_blocks=14, block_size=8),                  # forces recompute preemption
    dict(num_kv_blocks=128, max_num_batched_tokens=16),    # forces chunked prefill
    dict(num_kv_blocks=40, block_size=4, max_num_batched_tokens=24, max_num_seqs=3),
], ids=["preemption", "chunked-prefill", "all-constrained"])
def test_outputs_unchanged_under_memory_and_budget_pressure(name, settings, hf_reference):
    path, hf_tokens, _ = hf_reference(name)
    llm = LLM(model=str(path), dtype="float32", **settings)
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_tokens
    if settings["num_kv_blocks"] == 14:
        assert llm.engine.scheduler.num_preemptions > 0, "the tiny KV budget was meant to force preemption"
    llm.engine.kv.check_integrity()
    assert llm.engine.kv.num_used_blocks == 0


@pytest.mark.slow
def test_triton_backend_matches_hf(hf_reference, monkeypatch):
    """The same greedy parity through the Triton kernels (interpreted on the CPU), with
    chunked prefill and preemption in play so mixed prefill/decode launches occur."""
    pytest.importorskip("triton", reason="Triton is not installed (pip install 'quire[triton]')")
    monkeypatch.setenv("QUIRE_ATTENTION_BACKEND", "triton")
    path, hf_tokens, hf_logits = hf_reference("llama-gqa4")
    llm = LLM(model=str(path), dtype="float32", num_kv_blocks=14, block_size=8, max_num_batched_tokens=48)
    assert llm.engine.executor.worker.runner.backend == "triton"
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_tokens
    assert llm.engine.scheduler.num_preemptions > 0
    for i, logits in enumerate(llm.engine.executor.worker.runner.prompt_logits(PROMPTS[:2])):
        torch.testing.assert_close(logits, hf_logits[i], atol=1e-4, rtol=0)
