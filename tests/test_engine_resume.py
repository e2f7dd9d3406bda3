"""Resuming a generation on another engine (what migration between replicas does): the
continuation, given the prompt and the tokens already delivered, produces exactly the tokens
and text the undisturbed run would have, for greedy, seeded and penalised sampling; and the
router's hasher computes the replicas' block hashes."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quire.cluster.core.block_hash import BlockHasher, new_hash_seed
from quire.cluster.core.request import Request
from quire.cluster.serving.llm import LLM
from quire.protos.step import SamplingParams

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(model=str(tiny_checkpoint("llama-gqa4")), dtype="float32", num_kv_blocks=64, max_model_len=128)


def run(llm, params, resume=None):
    """Token ids and text of one request, through the engine directly (so it can resume)."""
    engine = llm.engine
    request_id = engine.add_request(PROMPT, params, resume_token_ids=resume)
    tokens, text = [], ""
    while engine.has_unfinished():
        for output in engine.step():
            assert output.request_id == request_id
            tokens += output.outputs[0].token_ids
            text += output.outputs[0].text
    engine.kv.check_integrity()
    assert engine.kv.pool.num_free_blocks == engine.kv.pool.num_blocks
    return tokens, text


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=3, presence_penalty=1.5,
                   frequency_penalty=0.5, repetition_penalty=1.3, ignore_eos=True),
], ids=["greedy", "seeded", "seeded-penalties"])
@pytest.mark.parametrize("cut", [1, 5, 11])
def test_a_resumed_stream_goes_on_token_and_text_exact(llm, params, cut):
    tokens, text = run(llm, params)
    assert len(tokens) == 12
    rest, rest_text = run(llm, params, resume=tokens[:cut])
    assert rest == tokens[cut:]
    first_text = llm.get_tokenizer().decode(tokens[:cut], skip_special_tokens=True)
    assert text.startswith(first_text) or cut == 1  # (the first token's leading space is context's)
    assert rest_text == text[len(text) - len(rest_text):]
    assert text.endswith(rest_text)


@pytest.mark.parametrize("resume, params, field", [
    ([1, 2], SamplingParams(max_tokens=2), "resume_token_ids"),
    ([1], SamplingParams(max_tokens=4, n=2), "n"),
    ([-1], SamplingParams(max_tokens=4), "resume_token_ids"),
    ([True], SamplingParams(max_tokens=4), "resume_token_ids"),
    ([10 ** 9], SamplingParams(max_tokens=4), "resume_token_ids"),
    ("12", SamplingParams(max_tokens=4), "resume_token_ids"),
])
def test_bad_resume_is_refused_naming_the_field(llm, resume, params, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        llm.engine.add_request(PROMPT, params, resume_token_ids=resume)
    assert not llm.engine.has_unfinished()


@settings(max_examples=50, deadline=None)
@given(tokens=st.lists(st.integers(0, 2 ** 31 - 1), max_size=70), salt=st.none() | st.text(min_size=1),
       block_size=st.sampled_from([1, 4, 16]))
def test_the_router_hasher_computes_the_replicas_block_hashes(tokens, salt, block_size):
    from quire.cluster.core.block_pool import BlockPool
    from quire.cluster.core.kv_cache_manager import KVCacheManager

    seed = bytes.fromhex(new_hash_seed())
    manager = KVCacheManager(BlockPool(4), block_size, hash_seed=seed)
    request = Request("r", tokens, SamplingParams(), cache_salt=salt)
    assert BlockHasher(block_size, seed).prefix_hashes(tokens, salt) == manager.block_hashes(request, len(tokens))
    other = KVCacheManager(BlockPool(4), block_size, hash_seed=bytes(32))
    if len(tokens) >= block_size:
        assert other.block_hashes(request, len(tokens)) != manager.block_hashes(request, len(tokens))
