"""The KV-dtype part of `benchmarks/memory.py`: what a quantized paged cache buys in the same bytes.

The byte budget is the memory benchmark's slot budget in the auto dtype's bytes:
``budget_bytes = budget_slots x bytes per token of the auto cache``. Each KV dtype
(``--kv-cache-dtypes``, default auto, int8, fp8_e4m3) gets ``budget_bytes //
bytes_per_block`` blocks, where ``bytes_per_block`` is what the workers size their pool by,
``quire.worker.kv_pool.KVCacheSpec(...).bytes_per_block(block_size)`` (codes plus the
float16 per-token, per-KV-head scales of a quantized cache). Per dtype, measured on the
real engine (``num_kv_blocks`` set from those bytes) serving the ``mixed`` workload
exactly as the memory benchmark does (all requests queued at once, stepped to the end):

* ``tokens_fit``: blocks x block_size (the token slots the bytes hold);
* ``requests_fit``: tokens_fit // the workload's mean final length (arithmetic);
* mean / peak concurrency (running requests per step), preemptions;
* output throughput: generated tokens / wall seconds of the run;

and the ratios of each to auto's. The auto row reuses the main ``mixed`` run when there is
one (the same engine, budget and workload). Goals: int8 tokens >= 3.8x auto's (float32 on
the CPU, measured) and >= 1.9x bfloat16's, the latter computed arithmetically from
``KVCacheSpec`` with dtype bfloat16 (no run). The benchmark's tiny model has one head of
64 (the smallest real head dim: the scales weigh most there); the same ratios are also
computed from ``KVCacheSpec`` for a 70B-like geometry (80 layers, 8 KV heads, head_dim 128).
"""
from __future__ import annotations

import sys

import torch

KV_DTYPES = ("auto", "int8", "fp8_e4m3")
GOAL_INT8_VS_FP32, GOAL_INT8_VS_BF16 = 3.8, 1.9
LARGE_GEOMETRY = {"name": "70B-like", "num_layers": 80, "num_kv_heads": 8, "head_size": 128}


def spec(geometry: dict, kv_cache_dtype: str, model_dtype: torch.dtype):
    """The KVCacheSpec the workers would use for `geometry` and a `--kv-cache-dtype` name."""
    from quire.kernels.kv_quant import cache_dtype
    from quire.worker.kv_pool import KVCacheSpec

    return KVCacheSpec(num_layers=geometry["num_layers"], num_kv_heads=geometry["num_kv_heads"],
                       head_size=geometry["head_size"], dtype=cache_dtype(kv_cache_dtype, model_dtype))


def spec_ratios(geometry: dict, model_dtype: torch.dtype, block_size: int) -> dict:
    """Per KV dtype: bytes per block and tokens per byte relative to auto (`model_dtype`), arithmetic."""
    auto = spec(geometry, "auto", model_dtype).bytes_per_block(block_size)
    out = {}
    for name in KV_DTYPES:
        per_block = spec(geometry, name, model_dtype).bytes_per_block(block_size)
        out[name] = {"bytes_per_block": per_block, "tokens_ratio": auto / per_block}
    return out


def model_geometry(model_path: str) -> dict:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_path)
    return {"name": "benchmark model", "num_layers": c.num_hidden_layers,
            "num_kv_heads": getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            "head_size": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads}


def run_dtypes(args, model_path: str, run_quire, make_workload, allowed: list[int], main_results: dict) -> dict:
    """Serve the `mixed` workload once per KV dtype in the same KV bytes, with the memory
    benchmark's `run_quire` and `make_workload`; `main_results` are its workloads' results."""
    from quire.cluster import LLM

    geometry = model_geometry(model_path)
    bs = args.block_size
    budget_slots = args.budget_slots // bs * bs
    budget_bytes = budget_slots * spec(geometry, "auto", torch.float32).bytes_per_block(bs) // bs
    work = make_workload("mixed", args.num_mixed, args.seed, allowed, args.specs)
    mean_len = sum(len(p) + o for p, o in work) / len(work)
    rows = {}
    for name in args.kv_cache_dtypes:
        per_block = spec(geometry, name, torch.float32).bytes_per_block(bs)
        blocks = budget_bytes // per_block
        if name == "auto" and "mixed" in main_results and blocks * bs == budget_slots:
            quire, source = main_results["mixed"]["quire"], "the main mixed run (same engine and workload)"
        else:
            print(f"[memory] mixed with kv_cache_dtype={name}: {blocks} blocks ...", file=sys.stderr, flush=True)
            llm = LLM(model=model_path, dtype="float32", kv_cache_dtype=name, num_kv_blocks=blocks, block_size=bs,
                      max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                      max_model_len=args.max_model_len, enable_prefix_caching=False, seed=args.seed)
            try:
                quire, source = run_quire(llm, work), "a run of its own"
            finally:
                llm.shutdown()
        rows[name] = {"bytes_per_block": per_block, "num_blocks": blocks, "tokens_fit": blocks * bs,
                      "requests_fit": blocks * bs // max(int(mean_len), 1),
                      "mean_concurrency": quire["mean_concurrency"], "peak_concurrency": quire["peak_concurrency"],
                      "preemptions": quire["preemptions"], "generated_tokens": quire["generated_tokens"],
                      "wall_seconds": quire["wall_seconds"],
                      "output_tokens_per_s": quire["generated_tokens"] / max(quire["wall_seconds"], 1e-9),
                      "source": source}
    if "auto" in rows:
        base = rows["auto"]
        for row in rows.values():
            row["ratio_to_auto"] = {k: row[k] / max(base[k], 1e-9) for k in
                                    ("tokens_fit", "requests_fit", "mean_concurrency", "peak_concurrency",
                                     "output_tokens_per_s")}
    arithmetic = {f"{g['name']} {d}": {"geometry": g, "model_dtype": d,
                                       "ratios": spec_ratios(g, getattr(torch, d), bs)}
                  for g in (geometry, LARGE_GEOMETRY) for d in ("float32", "bfloat16")}
    goals = {"int8_vs_fp32_min": GOAL_INT8_VS_FP32, "int8_vs_bf16_min": GOAL_INT8_VS_BF16}
    if "int8" in rows and "auto" in rows:
        goals["int8_vs_fp32_measured"] = rows["int8"]["ratio_to_auto"]["tokens_fit"]
        goals["int8_vs_fp32_measured_met"] = goals["int8_vs_fp32_measured"] >= GOAL_INT8_VS_FP32
    for g in (geometry, LARGE_GEOMETRY):
        for d, goal in (("float32", GOAL_INT8_VS_FP32), ("bfloat16", GOAL_INT8_VS_BF16)):
            ratio = arithmetic[f"{g['name']} {d}"]["ratios"]["int8"]["tokens_ratio"]
            goals[f"int8_vs_{d} ({g['name']}, arithmetic)"] = {"ratio": ratio, "met": ratio >= goal}
    return {"budget_bytes": budget_bytes, "budget_slots_auto": budget_slots, "workload": "mixed",
            "num_requests": len(work), "mean_final_len": mean_len, "model_geometry": geometry,
            "rows": rows, "arithmetic": arithmetic, "goals": goals}


def format_table(section: dict) -> str:
    g = section["model_geometry"]
    lines = [f"KV dtypes in the same {section['budget_bytes'] / 2**20:.2f} MiB ({section['budget_slots_auto']} auto "
             f"slots), mixed workload ({section['num_requests']} requests, mean len {section['mean_final_len']:.0f}); "
             f"model {g['num_layers']} layers x {g['num_kv_heads']} KV heads x head_dim {g['head_size']}, float32",
             f"{'kv dtype':<10}{'B/block':>9}{'blocks':>8}{'tokens fit':>11}{'x auto':>8}{'reqs fit':>9}"
             f"{'conc mean/peak':>15}{'x auto':>8}{'preempt':>8}{'out tok/s':>10}{'x auto':>8}"]
    for name, r in section["rows"].items():
        ratio = r.get("ratio_to_auto", {})
        lines.append(f"{name:<10}{r['bytes_per_block']:>9}{r['num_blocks']:>8}{r['tokens_fit']:>11}"
                     f"{ratio.get('tokens_fit', float('nan')):>7.2f}x{r['requests_fit']:>9}"
                     f"{r['mean_concurrency']:>10.1f}/{r['peak_concurrency']:<4}"
                     f"{ratio.get('mean_concurrency', float('nan')):>7.2f}x{r['preemptions']:>8}"
                     f"{r['output_tokens_per_s']:>10.0f}{ratio.get('output_tokens_per_s', float('nan')):>7.2f}x")
    lines.append("tokens per byte vs auto, from KVCacheSpec (arithmetic): "
                 + "; ".join(f"{k}: int8 {v['ratios']['int8']['tokens_ratio']:.2f}x, fp8 "
                             f"{v['ratios']['fp8_e4m3']['tokens_ratio']:.2f}x" for k, v in section["arithmetic"].items()))
    goals = section["goals"]
    if "int8_vs_fp32_measured" in goals:
        lines.append(f"goal int8 tokens >= {goals['int8_vs_fp32_min']}x fp32 (measured, this model): "
                     f"{goals['int8_vs_fp32_measured']:.2f}x ({'met' if goals['int8_vs_fp32_measured_met'] else 'NOT met'})")
    for key, value in goals.items():
        if isinstance(value, dict):
            lines.append(f"goal {key}: {value['ratio']:.2f}x ({'met' if value['met'] else 'NOT met'})")
    return "\n".join(lines)
