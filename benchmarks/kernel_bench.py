"""Decode attention over the paged KV cache: quire's Triton kernel against the card's
copy bandwidth and against torch SDPA on the same K/V held contiguously, in fp16 and bf16.

For each dtype, head shape (Llama-3-8B: 32 q / 8 kv heads; Llama-3-70B at tp=4: 16 q /
2 kv heads per GPU; head dim 128), batch (1, 16, 64) and context (512, 2k, 8k), it times
one decode step (one query token per request) and reports:
  - achieved GB/s = bytes of K and V read / kernel time, and its fraction of the
    device-to-device copy bandwidth measured by this script on the same card;
  - the kernel's time over SDPA's on contiguous `[batch, kv_heads, ctx, dim]` K/V;
  - per shape and dtype, the backend's warm-up: variants compiled and seconds taken.
`--kv-cache-dtype int8|fp8_e4m3` times quantized caches (`kv_quant`: one-byte codes and an
fp16 scale per token and KV head, both counted in the bytes read); SDPA then gets the
dequantized K/V in the activation dtype. "auto" (the default) keeps caches in each dtype.

Timing. A launch of a small case lasts microseconds, about what recording a CUDA event
costs, so each event pair times many launches (`launches_per_pair`, about 10 ms of work)
and a row reports the median over pairs of the time per launch. Consecutive launches cycle
through enough copies of the inputs that at least twice the L2 cache is touched between two
uses of one copy: every launch reads its K/V from HBM, never from L2 (big cases need one copy).

Writes JSON to `$OUT/kernel_bench.json` when OUT is set, else to stdout. `--dry-run` runs
tiny shapes with the same report layout anywhere (on the CPU through Triton's interpreter):
it checks the script, its numbers mean nothing.

    python benchmarks/kernel_bench.py             # on a CUDA machine
    python benchmarks/kernel_bench.py --dry-run   # tiny shapes, CPU or GPU
    python benchmarks/kernel_bench.py --kv-cache-dtype int8
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"llama3-8b": (32, 8, 128), "llama3-70b-tp4": (16, 2, 128)}
DTYPES = (torch.float16, torch.bfloat16)
PAIR_SECONDS = 0.01  # work per CUDA event pair
MAX_COPIES = 64


def time_per_launch(fns: list, device: torch.device, pairs: int) -> tuple[float, int]:
    """Median seconds per launch, cycling through `fns` (one per input copy), and the launches per
    timed pair. On CUDA, each event pair brackets ~PAIR_SECONDS of launches; elsewhere, wall time."""
    fns[0]()  # first call outside timing (allocator, any compile the warm-up did not cover)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    began = time.perf_counter()
    for fn in fns:
        fn()
    sync()
    estimate = (time.perf_counter() - began) / len(fns)
    reps = max(len(fns), min(5000, round(PAIR_SECONDS / max(estimate, 1e-7)))) if device.type == "cuda" else len(fns)
    samples = []
    for _ in range(pairs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(reps):
                fns[i % len(fns)]()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / reps)
        else:
            began = time.perf_counter()
            for i in range(reps):
                fns[i % len(fns)]()
            samples.append((time.perf_counter() - began) / reps)
    return statistics.median(samples), reps


def copies_for(bytes_per_copy: int, device: torch.device) -> int:
    """Input copies to cycle through so that 2x L2 is touched between two uses of one copy."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20
    return max(1, min(MAX_COPIES, math.ceil(2 * l2 / bytes_per_copy) + 1))


def copy_bandwidth(device: torch.device, size_bytes: int, pairs: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write)."""
    src = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds, _ = time_per_launch([lambda: dst.copy_(src)], device, pairs)
    return 2 * size_bytes / seconds


def sdpa_fn(q, k, v, scale, group):
    """SDPA over contiguous K/V (GQA natively where this torch has it, else K/V repeated per head)."""
    try:
        F.scaled_dot_product_attention(q[:1], k[:1], v[:1], scale=scale, enable_gqa=True)
        return lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
    except (TypeError, RuntimeError):
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return lambda: F.scaled_dot_product_attention(q, k, v, scale=scale)


def bench_case(num_heads, num_kv_heads, head_dim, batch, ctx, block_size, dtype, device, pairs,
               cache_dtype=None) -> dict:
    from quire.kernels import kv_quant
    from quire.kernels.triton_attention import TritonAttentionPlan, paged_attention

    cache_dtype = cache_dtype or dtype
    quantized = kv_quant.is_quantized(cache_dtype)
    blocks_per_req = -(-ctx // block_size)
    total_blocks = batch * blocks_per_req
    token_bytes = 2 * num_kv_heads * kv_quant.bytes_per_token_head(head_dim, cache_dtype)  # K and V, scales included
    kv_bytes, cache_bytes = batch * ctx * token_bytes, total_blocks * block_size * token_bytes
    group, scale = num_heads // num_kv_heads, head_dim ** -0.5
    plan = TritonAttentionPlan.build([ctx] * batch, list(range(batch + 1)), group, num_kv_heads, device)
    paged, sdpa, first = [], [], None
    for _ in range(copies_for(cache_bytes, device)):
        k_cache = torch.randn(total_blocks, block_size, num_kv_heads, head_dim, device=device).to(dtype)
        v_cache = torch.randn_like(k_cache)
        scales = (None, None)
        if quantized:  # the kernel reads codes and scales; SDPA below the values they stand for
            (k_codes, k_scale), (v_codes, v_scale) = (kv_quant.quantize(c, cache_dtype) for c in (k_cache, v_cache))
            k_cache = kv_quant.dequantize(k_codes, k_scale, dtype)
            v_cache = kv_quant.dequantize(v_codes, v_scale, dtype)
            scales = (k_scale, v_scale)
        else:
            k_codes, v_codes = k_cache.to(cache_dtype), v_cache.to(cache_dtype)
        tables = torch.randperm(total_blocks, device=device).view(batch, blocks_per_req)
        query = torch.randn(batch, num_heads, head_dim, device=device).to(dtype)
        paged.append(lambda q=query, k=k_codes, v=v_codes, t=tables, s=scales:
                     paged_attention(q, k, v, t, plan, scale, *s))
        # The same K/V, contiguous, as SDPA wants them.
        k = k_cache[tables].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()
        v = v_cache[tables].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()
        sdpa.append(sdpa_fn(query.unsqueeze(2), k, v, scale, group))
        first = first or (paged[0], sdpa[0])
    paged_s, paged_reps = time_per_launch(paged, device, pairs)
    sdpa_s, _ = time_per_launch(sdpa, device, pairs)
    max_error = (first[0]().float() - first[1]().squeeze(2).float()).abs().max().item()
    return {"batch": batch, "context": ctx, "num_splits": plan.num_splits, "input_copies": len(paged),
            "launches_per_pair": paged_reps, "paged_seconds": paged_s, "sdpa_contiguous_seconds": sdpa_s,
            "paged_over_sdpa": paged_s / sdpa_s, "kv_bytes": kv_bytes, "paged_gb_per_s": kv_bytes / paged_s / 1e9,
            "max_abs_error_vs_sdpa": max_error}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", "--smoke", action="store_true", dest="dry_run",
                        help="tiny shapes, same report: checks the script (on the CPU through Triton's interpreter)")
    parser.add_argument("--pairs", type=int, default=5, help="timed event pairs per measurement")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "int8", "fp8_e4m3"),
                        help="cache dtype: each activation dtype's (auto), or quantized codes with scales")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        # Chosen before the kernels' module is imported: Triton reads it when it decorates them.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from quire.kernels import kv_quant
    from quire.kernels.triton_attention import TritonAttentionBackend

    batches, contexts, shapes = (1, 16, 64), (512, 2048, 8192), SHAPES
    pairs, copy_bytes = args.pairs, 1 << 30
    if args.dry_run:
        batches, contexts, pairs, copy_bytes = (1, 2), (40, 600), 1, 1 << 20  # 600: a split launch
        shapes = {name: (h // 8, kv // 2 or 1, 32) for name, (h, kv, _) in SHAPES.items()}
    copy_bw = copy_bandwidth(device, copy_bytes, pairs)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dry_run": args.dry_run, "dtypes": [str(d).replace("torch.", "") for d in DTYPES],
              "kv_cache_dtype": args.kv_cache_dtype, "block_size": args.block_size,
              "timing": {"pairs": pairs, "seconds_per_pair": PAIR_SECONDS},
              "copy_gb_per_s": copy_bw / 1e9, "warm_up": {}, "results": {}}
    backend = TritonAttentionBackend()
    for dtype in DTYPES:
        dtype_name = str(dtype).replace("torch.", "")
        cache_dtype = kv_quant.cache_dtype(args.kv_cache_dtype, dtype)
        report["warm_up"][dtype_name], report["results"][dtype_name] = {}, {}
        for name, (heads, kv_heads, head_dim) in shapes.items():
            warm = backend.warm_up(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                                   block_size=args.block_size, dtype=dtype, device=device,
                                   kv_cache_dtype=cache_dtype)
            report["warm_up"][dtype_name][name] = {"variants": warm.variants, "seconds": warm.seconds}
            rows = []
            for batch in batches:
                for ctx in contexts:
                    row = bench_case(heads, kv_heads, head_dim, batch, ctx, args.block_size, dtype, device, pairs,
                                     cache_dtype)
                    row["fraction_of_copy_bandwidth"] = row["paged_gb_per_s"] * 1e9 / copy_bw
                    rows.append(row)
                    print(f"{dtype_name} {name} batch={batch:3d} ctx={ctx:5d} splits={row['num_splits']:2d} "
                          f"{row['paged_gb_per_s']:8.1f} GB/s ({row['fraction_of_copy_bandwidth']:.0%} of copy) "
                          f"paged/sdpa={row['paged_over_sdpa']:.2f} err={row['max_abs_error_vs_sdpa']:.1e}",
                          file=sys.stderr, flush=True)
            report["results"][dtype_name][name] = rows
    text = json.dumps(report, indent=2)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "kernel_bench.json").write_text(text)
    else:
        print(text)
    return report


if __name__ == "__main__":
    main()
