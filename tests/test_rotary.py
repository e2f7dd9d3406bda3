"""One rotary table per model: its bytes do not grow with depth, it is looked up once per
step whatever the number of layers, and it matches HF's rotary embedding, scaled variants
included (end-to-end parity is tests/test_hf_parity.py)."""
import pytest
import torch
import transformers

from quire.kernels.backend import select_backend
from quire.worker.kv_pool import KVPool
from quire.worker.model_runner import ModelRunner
from quire.worker.models.llama import LlamaForCausalLM
from quire.worker.parallel import ParallelContext
from quire.worker.rotary import RotaryEmbedding, apply_rotary_pos_emb, rotate_qk_
from quire.worker.sampler import Sampler

MAX_POSITION = 512
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


def tiny_model(num_layers: int) -> LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=num_layers,
                                      max_position_embeddings=MAX_POSITION)
    torch.manual_seed(0)
    return LlamaForCausalLM(config, ParallelContext(), torch.float32, MAX_POSITION).eval()


def buffer_bytes(model) -> int:
    return sum(b.numel() * b.element_size() for b in model.buffers())


def test_one_rotary_table_whatever_the_depth():
    shallow, deep = tiny_model(2), tiny_model(6)
    assert buffer_bytes(shallow) == buffer_bytes(deep) == 2 * MAX_POSITION * 16 * 4  # cos + sin, head_dim 16, fp32
    names = {name for name, _ in deep.named_buffers()}
    assert names == {"model.rotary_emb.cos", "model.rotary_emb.sin"}, "no layer keeps its own table"


@pytest.mark.parametrize("num_layers", [2, 6])
def test_the_table_is_looked_up_once_per_step(num_layers):
    model = tiny_model(num_layers)
    calls = []
    model.model.rotary_emb.register_forward_hook(lambda module, args, out: calls.append(args[0].numel()))
    device = torch.device("cpu")
    pool = KVPool(model.kv_cache_spec(), num_blocks=8, block_size=4, device=device)
    runner = ModelRunner(model, ParallelContext(), device, pool, select_backend(device), Sampler(0))
    runner.prompt_logits([[1, 2, 3, 4, 5], [6, 7, 8]])
    assert calls == [8], "one lookup for the step's 8 tokens, shared by every layer"


def hf_config(**rope):
    return transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=MAX_POSITION, **rope)


@pytest.mark.parametrize("rope", [
    dict(rope_theta=10000.0),
    dict(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING),
    dict(rope_theta=10000.0, rope_scaling={"rope_type": "linear", "factor": 4.0}),
], ids=["default", "llama3", "linear"])
def test_rotation_matches_hf(rope):
    from transformers.models.llama import modeling_llama

    config = hf_config(**rope)
    positions = torch.tensor([0, 1, 2, 63, 64, 65, 300, 511])
    torch.manual_seed(0)
    q, k = torch.randn(len(positions), 4 * 16), torch.randn(len(positions), 2 * 16)
    cos, sin = RotaryEmbedding(config, 16, MAX_POSITION, torch.float32)(positions)
    ours_q, ours_k = apply_rotary_pos_emb(q, k, cos, sin)

    hf_cos, hf_sin = modeling_llama.LlamaRotaryEmbedding(config)(q, positions[None])
    hf_q, hf_k = modeling_llama.apply_rotary_pos_emb(q.view(1, -1, 4, 16).transpose(1, 2),
                                                     k.view(1, -1, 2, 16).transpose(1, 2), hf_cos, hf_sin)
    torch.testing.assert_close(ours_q, hf_q.transpose(1, 2).reshape_as(q), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_k, hf_k.transpose(1, 2).reshape_as(k), atol=1e-5, rtol=1e-5)


def test_in_place_rotation_of_a_fused_projection_is_bit_identical_to_hf():
    """The layers rotate the query and key columns of the fused QKV output in place (v and
    the row stride untouched); every value equals HF's rotate-half formula bit for bit."""
    from transformers.models.llama import modeling_llama

    config = hf_config(rope_theta=10000.0)
    positions = torch.tensor([0, 1, 5, 64, 300, 511])
    torch.manual_seed(1)
    qkv = torch.randn(len(positions), (4 + 2 + 2) * 16)
    before = qkv.clone()
    cos, sin = RotaryEmbedding(config, 16, MAX_POSITION, torch.float32)(positions)
    rotate_qk_(qkv[:, :6 * 16], cos, sin)

    hf_cos, hf_sin = modeling_llama.LlamaRotaryEmbedding(config)(qkv, positions[None])
    heads = before[:, :6 * 16].view(len(positions), 6, 16)
    hf_cos, hf_sin = hf_cos[0][:, None], hf_sin[0][:, None]
    expected = heads * hf_cos + modeling_llama.rotate_half(heads) * hf_sin
    assert torch.equal(qkv[:, :6 * 16].view_as(expected), expected)
    assert torch.equal(qkv[:, 6 * 16:], before[:, 6 * 16:]), "v is left alone"
