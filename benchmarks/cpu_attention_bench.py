"""Attention alone on the CPU: the C++ in-place kernel (`cpu` backend, kernels/cpu_attention.py)
against the torch reference (`torch` backend, gather + SDPA), side by side in one run.

Cases (one layer's `attend` through the `AttentionBackend` contract; the plan is built once
per case, untimed, as a worker builds it once per step for all layers):
  - `decode64`: 64 single-token decodes, contexts uniform in 32..768;
  - `mixed`: 4 prefill chunks of 256 tokens (after cached prefixes of 0..512) plus 32 decodes
    with contexts in 32..768.
Geometry by default: 12 query heads, 4 KV heads, head dim 64, block size 16, fp32, torch threads 2,
block tables shuffled over the pool. `kv_gbps`: the K/V bytes of every context position (what a
decode must read, once) per second, beside `machine_read_gbps` (a streaming read of 512 MiB):
decode attention is memory-bound, and that is its floor. Each backend is timed `--repeats` times, interleaved, after
a warm-up call; the median is reported, with the speed-up (torch time / cpu time) and the max
abs difference of the outputs. Also reported: the kernel's build-or-load seconds in this process.

    python benchmarks/cpu_attention_bench.py --out cpu_attention.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from quire.kernels import kv_quant
from quire.kernels.attention_ref import TorchAttentionBackend
from quire.kernels.cpu_attention import CpuPagedAttentionBackend, extension_name, load_extension


def make_case(shapes, num_heads, num_kv_heads, head_dim, block_size, dtype, cache_dtype, seed):
    """Caches, shuffled block tables and queries for requests of (cached tokens, query tokens)."""
    g = torch.Generator().manual_seed(seed)
    per_req = [-(-(c + q) // block_size) for c, q in shapes]
    num_blocks = sum(per_req)
    free = torch.randperm(num_blocks, generator=g).tolist()
    k, v = (torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g) for _ in "kv")
    if kv_quant.is_quantized(cache_dtype):
        (k, ks), (v, vs) = kv_quant.quantize(k, cache_dtype), kv_quant.quantize(v, cache_dtype)
    else:
        k, v, ks, vs = k.to(cache_dtype), v.to(cache_dtype), None, None
    tables = [[free.pop() for _ in range(n)] for n in per_req]
    width = max(per_req)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    seq_lens = [c + q for c, q in shapes]
    starts = [0]
    for _, q in shapes:
        starts.append(starts[-1] + q)
    query = torch.randn(starts[-1], num_heads, head_dim, generator=g).to(dtype)
    return dict(query=query, k=k, v=v, ks=ks, vs=vs, block_tables=block_tables, seq_lens=seq_lens, starts=starts)


def time_backends(case, backends, num_heads, num_kv_heads, block_size, scale, repeats):
    plans = {name: b.plan(case["block_tables"], case["seq_lens"], case["starts"], block_size=block_size,
                          num_heads=num_heads, num_kv_heads=num_kv_heads) for name, b in backends.items()}
    outs, times = {}, {name: [] for name in backends}

    def call(name):
        return backends[name].attend(case["query"], case["k"], case["v"], plans[name], scale, case["ks"], case["vs"])

    for name in backends:
        outs[name] = call(name)  # warm-up
    for _ in range(repeats):
        for name in backends:  # interleaved, so drifts in machine speed hit both alike
            began = time.perf_counter()
            call(name)
            times[name].append(time.perf_counter() - began)
    medians = {name: statistics.median(t) for name, t in times.items()}
    k = case["k"]
    # The K and V rows every context position needs, once (what a decode must read from memory).
    kv_bytes = 2 * sum(case["seq_lens"]) * k.shape[2] * k.shape[3] * k.element_size()
    return {
        "kv_bytes": kv_bytes,
        "kv_gbps": {name: round(kv_bytes / m / 1e9, 2) for name, m in medians.items()},
        "ms": {name: round(m * 1e3, 4) for name, m in medians.items()},
        "speedup_cpu_over_torch": round(medians["torch"] / medians["cpu"], 3),
        "max_abs_diff": float((outs["cpu"].float() - outs["torch"].float()).abs().max()),
        "num_tokens": case["query"].shape[0],
        "context_tokens": sum(case["seq_lens"]),
    }


def read_bandwidth_gbps(megabytes: int = 512) -> float:
    """Streaming read bandwidth on torch's threads (best of 5 sums of a tensor far larger than
    the caches): the floor for decode attention, whose K/V rows are read once each."""
    data = torch.ones(megabytes * 2 ** 20 // 4)
    data.sum()
    best = float("inf")
    for _ in range(5):
        began = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - began)
    return round(data.numel() * 4 / best / 1e9, 2)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--kv-cache-dtype", choices=list(kv_quant.KV_CACHE_DTYPES), default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the JSON report here (default: stdout)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cache_dtype = kv_quant.cache_dtype(args.kv_cache_dtype, dtype)
    load_seconds = load_extension()
    g = torch.Generator().manual_seed(args.seed)

    def contexts(n):
        return torch.randint(32, 769, (n,), generator=g).tolist()

    cases = {
        "decode64": [(c - 1, 1) for c in contexts(64)],
        "mixed": [(int(p), 256) for p in torch.randint(0, 513, (4,), generator=g)] + [(c - 1, 1) for c in contexts(32)],
    }
    backends = {"torch": TorchAttentionBackend(), "cpu": CpuPagedAttentionBackend()}
    report = {
        "geometry": dict(heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                         block_size=args.block_size, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype),
        "threads": torch.get_num_threads(), "repeats": args.repeats, "extension": extension_name(),
        "extension_load_seconds": round(load_seconds, 3), "machine_read_gbps": read_bandwidth_gbps(),
        "cases": {},
    }
    for i, (name, shapes) in enumerate(cases.items()):
        case = make_case(shapes, args.heads, args.kv_heads, args.head_dim, args.block_size, dtype, cache_dtype,
                         args.seed + i)
        report["cases"][name] = time_backends(case, backends, args.heads, args.kv_heads, args.block_size,
                                              args.head_dim ** -0.5, args.repeats)
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
