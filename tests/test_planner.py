"""`quire plan`: the flagship arithmetic (Llama-3-70B on 4 A100-80GB), and agreement with
what real workers load and allocate for tiny checkpoints on this machine."""
import json

import pytest
import torch

from quire.cluster import LLM
from quire.cluster.cli import main
from quire.cluster.tools.planner import ModelShape, make_plan
from quire.worker.loader import load_model
from quire.worker.parallel import ParallelContext

A100_80GB, A100_BANDWIDTH = 80 << 30, 2.039e12


def test_llama_3_70b_on_four_a100s():
    plan = make_plan(ModelShape.load("llama-3-70b"), tensor_parallel_size=4, dtype="bf16", block_size=16,
                     max_model_len=8192, gpu_memory=A100_80GB, gpu_memory_utilization=0.9, prompt_len=1024,
                     output_len=256, hbm_bandwidth=A100_BANDWIDTH)
    assert plan.weight_bytes_per_gpu == pytest.approx(35e9, rel=0.02), "70.6B parameters x 2 bytes / 4 GPUs"
    assert plan.kv_bytes_per_token == 8 * 128 * 80 * 2 * 2 // 4 == 80 * 1024
    assert plan.kv_bytes_per_block == 16 * 80 * 1024
    budget = int(A100_80GB * 0.9) - plan.weight_bytes_per_gpu - plan.activation_reserve_bytes
    assert plan.kv_budget_bytes == budget and plan.num_blocks == budget // plan.kv_bytes_per_block
    assert plan.concurrent_requests == min(256, plan.num_blocks // (1280 // 16))
    # The ceiling: every decode step reads this GPU's weights and the running requests' KV once.
    read = plan.weight_bytes_per_gpu + plan.concurrent_requests * (1024 + 128) * 80 * 1024
    assert plan.decode_steps_per_s_ceiling == pytest.approx(A100_BANDWIDTH / read)
    assert plan.decode_tokens_per_s_ceiling == pytest.approx(A100_BANDWIDTH / read * plan.concurrent_requests)
    assert plan.single_request_tokens_per_s_ceiling == pytest.approx(
        A100_BANDWIDTH / (plan.weight_bytes_per_gpu + 1024 * 80 * 1024))
    assert plan.allreduce_bytes_per_step_per_gpu == int(2 * 80 * plan.concurrent_requests * 8192 * 2 * 1.5)


def test_llama_3_8b_does_not_need_tensor_parallelism_and_70b_does():
    eight = make_plan(ModelShape.load("llama-3-8b"), dtype="bf16", gpu_memory=A100_80GB)
    assert eight.weight_bytes_per_gpu == pytest.approx(16.06e9, rel=0.01)
    assert eight.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        make_plan(ModelShape.load("llama-3-70b"), tensor_parallel_size=1, dtype="bf16", gpu_memory=A100_80GB)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        make_plan(ModelShape.load("llama-3-70b"), tensor_parallel_size=3)
    fp8 = make_plan(ModelShape.load("llama-3-70b"), tensor_parallel_size=4, dtype="bf16", kv_cache_dtype="fp8",
                    gpu_memory=A100_80GB)
    assert fp8.kv_bytes_per_token == 40 * 1024


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_planned_weights_are_what_each_rank_loads(tp, tiny_checkpoint):
    """2 KV heads (replicated at tp=4) and a vocabulary of 2051 (padded to a multiple of tp)."""
    path = tiny_checkpoint("llama-tp")
    planned = make_plan(ModelShape.load(str(path)), tensor_parallel_size=tp, dtype="float32").weight_bytes_per_gpu
    for rank in range(tp):
        model = load_model(path, ParallelContext(rank=rank, world_size=tp), torch.float32, torch.device("cpu"), 256)
        params = {id(p): p for p in model.parameters()}.values()
        assert sum(p.numel() * p.element_size() for p in params) == planned, f"rank {rank} of {tp}"


@pytest.mark.parametrize("name", ["llama-gqa4", "qwen2-bias", "llama3-tied-rope", "mistral-gqa"])
def test_planned_blocks_are_what_the_worker_allocates(name, tiny_checkpoint):
    path = tiny_checkpoint(name)
    budget = 3 << 20
    plan = make_plan(ModelShape.load(str(path / "config.json")), dtype="float32", kv_cache_memory=budget,
                     block_size=16)
    llm = LLM(model=str(path), dtype="float32", kv_cache_memory=budget, block_size=16)
    allocated = llm.engine.kv.pool.num_blocks
    llm.shutdown()
    assert plan.num_blocks == pytest.approx(allocated, rel=0.02) and plan.num_blocks == allocated
    assert plan.weight_bytes_per_gpu > 0


def test_plan_command_prints_text_and_json(capsys):
    assert main(["plan", "--model", "llama-3-70b", "-tp", "4", "--gpu", "a100-80gb", "--max-model-len", "8192",
                 "--dtype", "bf16"]) == 0
    text = capsys.readouterr().out
    assert "weights (this shard)" in text and "80.0 KiB" in text and "decode ceiling" in text
    assert main(["plan", "--model", "llama-3-70b", "-tp", "4", "--gpu-memory", "80GiB", "--hbm-bandwidth",
                 "2039GB/s", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["kv_bytes_per_token"] == 81920 and plan["hbm_bandwidth_bytes_per_s"] == 2.039e12
    assert main(["plan", "--model", "no-such-model"]) == 2
    assert "`model`" in capsys.readouterr().err
