"""benchmarks/memory.py on a tiny model and a small budget: the measured quantities are consistent,
and the KV dtypes get the blocks the same bytes buy."""
from __future__ import annotations

import json
import random

import pytest
import torch

SMALL_SPECS = {"short": ((4, 24), (4, 16)), "medium": ((32, 96), (8, 24)), "long": ((160, 320), (8, 24))}


@pytest.fixture(scope="module")
def memory(load_script):
    return load_script("benchmarks/memory.py")


def test_mixed_workload_proportions_and_ranges(memory):
    allowed = list(range(5, 100))
    work = memory.make_workload("mixed", 16, 0, allowed, SMALL_SPECS)
    assert work == memory.make_workload("mixed", 16, 0, allowed, SMALL_SPECS)  # seeded
    kinds = []
    for prompt, output_len in work:
        kind = [k for k, ((p_lo, p_hi), (o_lo, o_hi)) in SMALL_SPECS.items()
                if p_lo <= len(prompt) <= p_hi and o_lo <= output_len <= o_hi]
        assert len(kind) == 1 and set(prompt) <= set(allowed)
        kinds.append(kind[0])
    assert (kinds.count("short"), kinds.count("medium"), kinds.count("long")) == (8, 6, 2)


def test_small_run_is_consistent(memory, tmp_path, tokenizer_dir):
    model = memory.build_tiny_llama(tmp_path / "model", max_position_embeddings=512, tokenizer_dir=tokenizer_dir)
    out, png = tmp_path / "memory.json", tmp_path / "memory.png"
    budget, max_len = 1024, 512
    report = memory.main(["--model", str(model), "--budget-slots", str(budget), "--max-model-len", str(max_len),
                          "--max-num-batched-tokens", "256", "--num-short", "24", "--num-medium", "6",
                          "--num-long", "4", "--num-mixed", "16", "--out", str(out), "--plot", str(png)],
                         specs=SMALL_SPECS)
    assert json.loads(out.read_text())["results"].keys() == set(memory.WORKLOADS)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The benchmark's tiny Llama: 2 layers, 1 KV head of 64, float32.
    hf = report["hf_static_cache"]
    assert hf["bytes_per_sequence"] == 2 * 2 * 1 * 64 * max_len * 4 == hf["bytes_per_sequence_formula"]
    assert report["config"]["quire_bytes_per_slot"] == 2 * 2 * 1 * 64 * 4
    assert hf["concurrency"] == budget // max_len  # same bytes per token: same as pre-allocation

    for name, r in report["results"].items():
        q, series = r["quire"], r["quire"]["series"]
        assert len(series["allocated_slots"]) == len(series["live_slots"]) == len(series["running"]) == q["steps"] > 0
        for alloc, live in zip(series["allocated_slots"], series["live_slots"]):
            assert 0 <= live <= alloc <= budget  # prefix caching off: no slot counted twice
        assert series["allocated_slots"][-1] == series["running"][-1] == 0  # all freed at the end
        assert 0 < q["live_share"] <= 1 and 0 < r["preallocation"]["live_share"] <= 1
        assert q["live_share"] > r["preallocation"]["live_share"]
        assert r["preallocation"]["concurrency"] == budget // max_len
        assert q["mean_concurrency"] >= r["preallocation"]["concurrency"], name
        assert q["peak_concurrency"] >= q["mean_concurrency"]
        assert q["generated_tokens"] == r["output_tokens"]  # every request produced exactly its length
        assert r["ratio_vs_preallocation"] == pytest.approx(q["mean_concurrency"] / (budget // max_len))
    assert "live_share_mixed_met" in report["goals"] and set(report["goals"]["ratio_met"]) == set(memory.WORKLOADS)
    assert "mixed" in memory.format_table(report)

    # KV dtypes in the same bytes: blocks sized by the workers' KVCacheSpec arithmetic.
    from quire.worker.kv_pool import KVCacheSpec

    dtypes = report["kv_dtypes"]
    assert list(dtypes["rows"]) == ["auto", "int8", "fp8_e4m3"]
    budget_bytes = budget * KVCacheSpec(2, 1, 64, torch.float32).bytes_per_block(16) // 16
    assert dtypes["budget_bytes"] == budget_bytes
    for name, dtype in (("auto", torch.float32), ("int8", torch.int8), ("fp8_e4m3", torch.float8_e4m3fn)):
        row = dtypes["rows"][name]
        per_block = KVCacheSpec(2, 1, 64, dtype).bytes_per_block(16)
        assert row["bytes_per_block"] == per_block and row["tokens_fit"] == budget_bytes // per_block * 16
        assert row["generated_tokens"] == report["results"]["mixed"]["output_tokens"]
        assert 0 < row["mean_concurrency"] <= row["peak_concurrency"] and row["output_tokens_per_s"] > 0
    assert dtypes["rows"]["auto"]["tokens_fit"] == budget
    int8_ratio = dtypes["rows"]["int8"]["ratio_to_auto"]["tokens_fit"]
    # head_dim 64: 64 code bytes + 2 scale bytes against 256 fp32 bytes per token and head: >= 3.8x.
    assert int8_ratio == (budget_bytes // KVCacheSpec(2, 1, 64, torch.int8).bytes_per_block(16) * 16) / budget
    assert int8_ratio == pytest.approx(256 / 66, rel=0.01) and int8_ratio >= 3.8
    assert dtypes["rows"]["int8"]["mean_concurrency"] >= dtypes["rows"]["auto"]["mean_concurrency"]
    large = dtypes["arithmetic"]["70B-like bfloat16"]["ratios"]["int8"]["tokens_ratio"]
    assert large == KVCacheSpec(80, 8, 128, torch.bfloat16).bytes_per_block(16) / KVCacheSpec(
        80, 8, 128, torch.int8).bytes_per_block(16) == 256 / 130
    assert "fp8_e4m3" in memory.format_table(report)


def test_preallocation_arithmetic(memory):
    work = [([1] * random.Random(i).randint(1, 50), 10) for i in range(7)]
    pre = memory.preallocation(work, budget_slots=1000, max_model_len=100)
    assert pre["concurrency"] == 10
    assert pre["live_share"] == pytest.approx(sum(len(p) + o for p, o in work) / 700)
