"""`quire plan`: the flagship arithmetic (Llama-3-70B on 4 A100-80GB), and agreement with
what real workers load and allocate for tiny checkpoints on this machine."""
import json

import pytest
import torch

from quire.cluster import LLM
from quire.cluster.cli import main
from quire.cluster.core import config as engine_config
from quire.cluster.tools import planner
from quire.cluster.tools.planner import ModelShape, make_plan
from quire.kernels import kv_quant
from quire.worker.kv_pool import KVCacheSpec
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
    for name in ("int8", "fp8_e4m3"):  # one byte per value plus a 2-byte scale per token and KV head
        quantized = make_plan(ModelShape.load("llama-3-70b"), tensor_parallel_size=4, dtype="bf16",
                              kv_cache_dtype=name, gpu_memory=A100_80GB)
        assert quantized.kv_cache_dtype == name
        assert quantized.kv_bytes_per_token == 2 * 80 * 2 * (128 + 2) == 41600


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


def test_data_parallel_totals_are_replicas_times_one_replica():
    """`-dp 2`: every per-GPU / per-replica figure is the dp=1 one; the totals are exactly twice it."""
    config = dict(tensor_parallel_size=4, dtype="bf16", max_model_len=8192, gpu_memory=A100_80GB,
                  hbm_bandwidth=A100_BANDWIDTH)
    one = make_plan(ModelShape.load("llama-3-70b"), **config)
    two = make_plan(ModelShape.load("llama-3-70b"), data_parallel_size=2, **config)
    totals = {"data_parallel_size", "gpus_needed", "total_tokens", "total_requests_fit_in_kv",
              "total_concurrent_requests", "total_decode_tokens_per_s_ceiling"}
    per_replica = {k: v for k, v in vars(two).items() if k not in totals}
    assert per_replica == {k: v for k, v in vars(one).items() if k not in totals}
    assert (one.data_parallel_size, one.gpus_needed) == (1, 4)
    assert (two.data_parallel_size, two.gpus_needed) == (2, 2 * 4)
    assert one.total_tokens == one.tokens and two.total_tokens == 2 * two.tokens
    assert two.total_requests_fit_in_kv == 2 * two.requests_fit_in_kv
    assert two.total_concurrent_requests == 2 * two.concurrent_requests
    assert two.total_decode_tokens_per_s_ceiling == 2 * two.decode_tokens_per_s_ceiling
    # No bandwidth given: no ceiling per replica, none in total.
    cpu = make_plan(ModelShape.load("llama-3-8b"), data_parallel_size=3, tensor_parallel_size=2)
    assert cpu.gpus_needed == 6 and cpu.total_tokens == 3 * cpu.tokens
    assert cpu.decode_tokens_per_s_ceiling is None and cpu.total_decode_tokens_per_s_ceiling is None


def test_plan_command_with_data_parallel_size(capsys):
    base = ["plan", "--model", "llama-3-70b", "-tp", "4", "--gpu", "a100-80gb", "--max-model-len", "8192"]
    assert main([*base, "--data-parallel-size", "2"]) == 0
    text = capsys.readouterr().out
    assert "data_parallel_size=2" in text and "GPUs needed: 8 (2 replicas x tensor_parallel_size 4)" in text
    assert "per replica" in text and "KV tokens" in text and "output tokens/s ceiling" in text
    assert main(base) == 0  # one replica: the report as it was before data parallelism
    text = capsys.readouterr().out
    assert "data_parallel_size" not in text and "needed" not in text and "per replica" not in text
    assert main([*base, "-dp", "2", "--json"]) == 0
    two = json.loads(capsys.readouterr().out)
    assert main([*base, "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["data_parallel_size"] == 1 and one["gpus_needed"] == 4 and one["total_tokens"] == one["tokens"]
    assert two["data_parallel_size"] == 2 and two["gpus_needed"] == 8
    assert two["tokens"] == one["tokens"] and two["total_tokens"] == 2 * one["tokens"]
    assert two["total_concurrent_requests"] == 2 * one["concurrent_requests"]
    assert two["total_requests_fit_in_kv"] == 2 * one["requests_fit_in_kv"]
    assert two["total_decode_tokens_per_s_ceiling"] == 2 * one["decode_tokens_per_s_ceiling"]


@pytest.mark.parametrize("dp", ["0", "-1"])
def test_plan_refuses_a_data_parallel_size_below_one(dp, capsys):
    assert main(["plan", "--model", "llama-3-70b", "-tp", "4", "-dp", dp]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "--data-parallel-size" in captured.err and dp in captured.err
    with pytest.raises(ValueError, match="--data-parallel-size"):
        make_plan(ModelShape.load("llama-3-70b"), tensor_parallel_size=4, data_parallel_size=int(dp))


def test_plan_refuses_a_data_parallel_size_that_is_not_a_number(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["plan", "--model", "llama-3-70b", "--data-parallel-size", "two"])
    assert exited.value.code == 2 and "--data-parallel-size" in capsys.readouterr().err


def test_plan_serve_and_the_workers_name_the_same_kv_cache_dtypes():
    assert planner.KV_CACHE_DTYPES == engine_config.KV_CACHE_DTYPES == kv_quant.KV_CACHE_DTYPES


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "fp8_e4m3"])
@pytest.mark.parametrize("dtype, torch_dtype", [("float32", torch.float32), ("bf16", torch.bfloat16),
                                                ("float16", torch.float16)])
@pytest.mark.parametrize("tp", [1, 4, 16])
def test_plan_and_the_workers_spec_agree_on_bytes_per_block(kv_cache_dtype, dtype, torch_dtype, tp):
    shape = ModelShape.load("llama-3-70b")  # 8 KV heads: split at tp 4, replicated at 16
    plan = make_plan(shape, tensor_parallel_size=tp, dtype=dtype, kv_cache_dtype=kv_cache_dtype, block_size=32)
    spec = KVCacheSpec(shape.num_layers, shape.kv_heads_per_rank(tp), shape.head_dim,
                       kv_quant.cache_dtype(kv_cache_dtype, torch_dtype))
    assert plan.kv_bytes_per_block == spec.bytes_per_block(32)


@pytest.mark.parametrize("bad", ["fp8", "bf16", "fp16", "fp32", "int4"])
def test_plan_accepts_only_the_kv_cache_dtypes_serve_runs(bad, capsys):
    with pytest.raises(ValueError, match=f"`kv_cache_dtype` '{bad}'"):
        make_plan(ModelShape.load("llama-3-8b"), kv_cache_dtype=bad)
    with pytest.raises(SystemExit) as exited:
        main(["plan", "--model", "llama-3-8b", "--kv-cache-dtype", bad])
    assert exited.value.code == 2 and "--kv-cache-dtype" in capsys.readouterr().err


def test_plan_reports_the_host_tier(capsys):
    plan = make_plan(ModelShape.load("llama-3-8b"), dtype="bf16", kv_cache_dtype="int8", kv_host_memory=8 << 30)
    assert plan.kv_host_memory_bytes == 8 << 30
    assert plan.host_tier_tokens == (8 << 30) // plan.kv_bytes_per_block * plan.block_size
    assert make_plan(ModelShape.load("llama-3-8b")).host_tier_tokens == 0
    with pytest.raises(ValueError, match="`kv_host_memory`"):
        make_plan(ModelShape.load("llama-3-8b"), kv_host_memory=-1)
    argv = ["plan", "--model", "llama-3-8b", "--dtype", "bf16", "--kv-cache-dtype", "int8", "--kv-host-memory", "8GiB"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "kv_cache_dtype=int8" in text and "codes + float16 scales" in text
    assert f"host tier (prefix cache)       8.00 GiB of host memory: {plan.host_tier_tokens} tokens" in text
    assert main([*argv, "--json"]) == 0
    reported = json.loads(capsys.readouterr().out)
    assert reported["host_tier_tokens"] == plan.host_tier_tokens and reported["kv_cache_dtype"] == "int8"
    assert main(["plan", "--model", "llama-3-8b"]) == 0
    assert "host tier" not in capsys.readouterr().out
