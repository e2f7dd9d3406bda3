"""Decode attention over the paged KV cache: quire's Triton kernel against the card's
copy bandwidth and against torch SDPA on the same K/V held contiguously.

For each head shape (Llama-3-8B: 32 q / 8 kv heads; Llama-3-70B at tp=4: 16 q / 2 kv
heads per GPU; head dim 128), batch (1, 16, 64) and context (512, 2k, 8k), it times one
decode step (one query token per request) and reports:
  - achieved GB/s = bytes of K and V read / kernel time, and its fraction of the
    device-to-device copy bandwidth measured by this script on the same card;
  - the kernel's time over SDPA's on contiguous `[batch, kv_heads, ctx, dim]` K/V.
Writes JSON to `$OUT/kernel_bench.json` when OUT is set, else to stdout.

    python benchmarks/kernel_bench.py            # on a CUDA machine
    TRITON_INTERPRET=1 python benchmarks/kernel_bench.py --smoke   # tiny shapes, CPU, checks the script
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from quire.kernels.triton_attention import TritonAttentionPlan, paged_attention

SHAPES = {"llama3-8b": (32, 8, 128), "llama3-70b-tp4": (16, 2, 128)}


def timed(fn, device: torch.device, iters: int) -> float:
    """Median seconds of `fn()` over `iters` runs (CUDA events on a GPU)."""
    fn()
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            began = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - began)
    return statistics.median(samples)


def copy_bandwidth(device: torch.device, size_bytes: int, iters: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write)."""
    src = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * size_bytes / timed(lambda: dst.copy_(src), device, iters)


def bench_case(num_heads, num_kv_heads, head_dim, batch, ctx, block_size, dtype, device, iters):
    num_blocks_per_req = -(-ctx // block_size)
    total_blocks = batch * num_blocks_per_req
    k_cache = torch.randn(total_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(total_blocks, device=device).view(batch, num_blocks_per_req)
    query = torch.randn(batch, num_heads, head_dim, dtype=dtype, device=device)
    seq_lens, starts = [ctx] * batch, list(range(batch + 1))
    plan = TritonAttentionPlan.build(seq_lens, starts, num_heads // num_kv_heads, num_kv_heads, device)
    scale = head_dim ** -0.5
    paged_s = timed(lambda: paged_attention(query, k_cache, v_cache, tables, plan, scale), device, iters)

    # The same K/V, contiguous, as SDPA wants them.
    k = k_cache[tables].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()
    v = v_cache[tables].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()
    q = query.unsqueeze(2)
    try:
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)  # noqa: E731
        reference = sdpa()
    except (TypeError, RuntimeError):
        group = num_heads // num_kv_heads
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, scale=scale)  # noqa: E731
        reference = sdpa()
    sdpa_s = timed(sdpa, device, iters)
    got = paged_attention(query, k_cache, v_cache, tables, plan, scale)
    max_error = (got.float() - reference.squeeze(2).float()).abs().max().item()
    kv_bytes = 2 * batch * ctx * num_kv_heads * head_dim * k_cache.element_size()
    return {"batch": batch, "context": ctx, "num_splits": plan.num_splits, "paged_seconds": paged_s,
            "sdpa_contiguous_seconds": sdpa_s, "paged_over_sdpa": paged_s / sdpa_s,
            "kv_bytes": kv_bytes, "paged_gb_per_s": kv_bytes / paged_s / 1e9, "max_abs_error_vs_sdpa": max_error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script without a GPU")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    batches, contexts, shapes = (1, 16, 64), (512, 2048, 8192), SHAPES
    iters, copy_bytes = args.iters, 1 << 30
    if args.smoke:
        batches, contexts, iters, copy_bytes = (1, 2), (40,), 2, 1 << 20
        shapes = {name: (h // 8, kv // 2 or 1, 32) for name, (h, kv, _) in SHAPES.items()}
    copy_bw = copy_bandwidth(device, copy_bytes, iters)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": str(dtype).replace("torch.", ""), "block_size": args.block_size,
              "copy_gb_per_s": copy_bw / 1e9, "results": {}}
    for name, (heads, kv_heads, head_dim) in shapes.items():
        rows = []
        for batch in batches:
            for ctx in contexts:
                row = bench_case(heads, kv_heads, head_dim, batch, ctx, args.block_size, dtype, device, iters)
                row["fraction_of_copy_bandwidth"] = row["paged_gb_per_s"] * 1e9 / copy_bw
                rows.append(row)
                print(f"{name} batch={batch:3d} ctx={ctx:5d} splits={row['num_splits']:2d} "
                      f"{row['paged_gb_per_s']:8.1f} GB/s ({row['fraction_of_copy_bandwidth']:.0%} of copy) "
                      f"paged/sdpa={row['paged_over_sdpa']:.2f} err={row['max_abs_error_vs_sdpa']:.1e}", flush=True)
        report["results"][name] = rows
    text = json.dumps(report, indent=2)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "kernel_bench.json").write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
