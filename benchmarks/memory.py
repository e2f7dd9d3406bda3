#!/usr/bin/env python
"""KV-cache memory use: quire's paged blocks vs max-length pre-allocation and HF's static cache.

The PagedAttention argument, measured on the real engine. Under one fixed KV budget
(``--budget-slots`` token slots, default 65,536 = 4096 blocks of 16) and one
``max_model_len`` (8192), each workload (seeded random token-id prompts, greedy,
EOS ignored, so every request produces exactly its drawn output length):

* ``short``  prompt 16-128, output 16-128       * ``medium`` prompt 256-1024, output 64-256
* ``long``   prompt 2048-6144, output 64-256    * ``mixed``  1/2 short, 3/8 medium, 1/8 long

is served by three schemes:

* **quire** (measured): an ``LLM`` with ``num_kv_blocks = budget / block_size``, prefix
  caching off (no slot is shared, so live <= allocated), a large ``max_num_seqs`` (memory,
  not the sequence cap, limits concurrency) and a per-step token budget. All requests are
  queued at once and the engine is stepped until done. After every step: *allocated*
  slots = used blocks x block_size, *live* slots = sum over running requests of
  ``num_computed_tokens`` (tokens whose K/V is in the cache), *concurrency* = number of
  running requests. Reported: live share = sum(live) / sum(allocated) over steps (every
  step weighs the same), mean / peak concurrency (also the mean over steps while requests
  still wait, i.e. while memory is the limit), preemptions, steps and wall time.
* **max-length pre-allocation** (arithmetic from the workload, not a run): every request
  reserves ``max_model_len`` contiguous slots, so concurrency = budget // max_model_len and
  live share = mean over the same requests of final length / max_model_len (its share at
  the request's *end*: an upper bound, since a request is shorter while it runs).
* **HF static cache** (measured bytes): a ``transformers.StaticCache`` with
  ``max_cache_len = max_model_len`` for the benchmark's model, filled by one real forward
  pass of the HF model on a small batch; its K/V tensor bytes per sequence give the number
  of sequences the same KV bytes (budget x quire's measured bytes per token slot) hold.
  Its live share is that of max-length pre-allocation.

Ratios: quire mean concurrency over pre-allocation's (and HF static's). Goals checked:
live share >= 96% on ``mixed`` and >= 20x pre-allocation's concurrency (per workload).

KV dtypes (``--kv-cache-dtypes``, default auto,int8,fp8_e4m3; ``""`` skips them): the same
KV bytes (``budget_slots`` x the auto cache's bytes per token) in each dtype's blocks, sized
by ``KVCacheSpec.bytes_per_block``; per dtype the tokens that fit, requests that fit, mean /
peak concurrency and output throughput on ``mixed``, with ratios to auto, and the same
ratios from ``KVCacheSpec`` arithmetic for bfloat16 and a 70B-like geometry (see
``benchmarks/memory_dtypes.py``).

Unless ``--model`` is given, a tiny random Llama (hidden 64, 2 layers, 4 heads, 2 KV heads,
8192 positions, the tiny random model's tokenizer) is built into a temp dir: this is a
memory experiment, the weights do not matter. Example (a few minutes on 2 CPU cores):

    python benchmarks/memory.py --out memory.json --plot memory.png      # --quick: a small run
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

SPECS = {"short": ((16, 128), (16, 128)), "medium": ((256, 1024), (64, 256)), "long": ((2048, 6144), (64, 256))}
MIX = (("short", 4), ("medium", 3), ("long", 1))  # parts of 8
WORKLOADS = ("short", "medium", "long", "mixed")
GOAL_LIVE_MIXED, GOAL_RATIO = 0.96, 20.0


def _load_sibling(name: str):
    """A module beside this script (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


memory_dtypes = _load_sibling("memory_dtypes")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: build a tiny Llama with 8192 positions)")
    p.add_argument("--budget-slots", type=int, default=65536, help="KV budget in token slots")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=1024)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of " + ",".join(WORKLOADS))
    p.add_argument("--num-short", type=int, default=800)
    p.add_argument("--num-medium", type=int, default=160)
    p.add_argument("--num-long", type=int, default=32)
    p.add_argument("--num-mixed", type=int, default=240)
    p.add_argument("--hf-batch", type=int, default=2, help="batch of the HF StaticCache measured")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--kv-cache-dtypes", default=",".join(memory_dtypes.KV_DTYPES),
                   help="KV dtypes compared in the same bytes on mixed (comma-separated; empty: none)")
    p.add_argument("--quick", action="store_true", help="small run: 16k-slot budget and few requests")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--plot", help="write a PNG chart here")
    args = p.parse_args(argv)
    if args.quick:
        args.budget_slots = 16384
        args.num_short, args.num_medium, args.num_long, args.num_mixed = 96, 24, 4, 40
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if unknown := set(args.workloads) - set(WORKLOADS):
        p.error(f"unknown workloads: {sorted(unknown)}")
    args.kv_cache_dtypes = [d.strip() for d in args.kv_cache_dtypes.split(",") if d.strip()]
    if unknown := set(args.kv_cache_dtypes) - set(memory_dtypes.KV_DTYPES):
        p.error(f"unknown KV cache dtypes: {sorted(unknown)}")
    return args


def build_tiny_llama(directory: Path, max_position_embeddings: int = 8192, tokenizer_dir: Path | None = None) -> Path:
    """A random tiny Llama (see `quire.cluster.tools.default_model.build_tiny_llama`) with one
    head of 64: real models' head dims are 64-128, and a quantized cache's scale (2 bytes per
    token and head) weighs what it does there, not 2 in 18 as at head dim 16. One KV head of 64
    takes the bytes two of 16 would: the KV budget's token slots are unchanged."""
    from quire.cluster.tools.default_model import build_tiny_llama as build

    return build(directory, max_position_embeddings, tokenizer_dir, num_attention_heads=1, num_key_value_heads=1)


def make_workload(name: str, num_requests: int, seed: int, allowed: list[int],
                  specs: dict = SPECS) -> list[tuple[list[int], int]]:
    """`num_requests` (prompt token ids, output length) pairs, lengths uniform in the
    workload's ranges; `mixed` takes exactly 4/8 short, 3/8 medium, the rest long, shuffled."""
    rng = random.Random(f"{name}-{seed}")
    if name == "mixed":
        kinds = [k for k, parts in MIX[:2] for _ in range(num_requests * parts // 8)]
        kinds += ["long"] * (num_requests - len(kinds))
        rng.shuffle(kinds)
    else:
        kinds = [name] * num_requests
    work = []
    for kind in kinds:
        (p_lo, p_hi), (o_lo, o_hi) = specs[kind]
        prompt_len, output_len = rng.randint(p_lo, p_hi), rng.randint(o_lo, o_hi)
        work.append(([rng.choice(allowed) for _ in range(prompt_len)], output_len))
    return work


def run_quire(llm, work: list[tuple[list[int], int]]) -> dict:
    """Queue every request, step the engine until all finish, and sample allocated slots,
    live slots and running requests after every step (see the module docstring)."""
    from quire.cluster import SamplingParams

    engine = llm.engine
    kv, scheduler = engine.kv, engine.scheduler
    assert not engine.has_unfinished() and kv.num_used_blocks == 0, "the engine must start empty"
    for prompt, output_len in work:
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True))
    preemptions_before, steps_before = scheduler.num_preemptions, engine.stats.num_steps
    allocated, live, running, waiting, generated = [], [], [], [], 0
    started = time.perf_counter()
    while engine.has_unfinished():
        generated += len(engine.step())
        allocated.append(kv.num_used_blocks * kv.block_size)
        live.append(sum(r.num_computed_tokens for r in scheduler.running))
        running.append(len(scheduler.running))
        waiting.append(len(scheduler.waiting))
        if len(allocated) > 50 * (len(work) + 1000):
            raise RuntimeError("the engine makes no progress")
    wall = time.perf_counter() - started
    busy = [n for n, w in zip(running, waiting) if w]
    return {
        "live_share": sum(live) / max(sum(allocated), 1),
        "mean_concurrency": sum(running) / max(len(running), 1),
        "mean_concurrency_while_waiting": sum(busy) / len(busy) if busy else None,
        "peak_concurrency": max(running, default=0),
        "peak_allocated_slots": max(allocated, default=0),
        "peak_live_slots": max(live, default=0),
        "preemptions": scheduler.num_preemptions - preemptions_before,
        "steps": engine.stats.num_steps - steps_before,
        "sampled_steps": len(allocated),
        "generated_tokens": generated,
        "wall_seconds": wall,
        "series": {"allocated_slots": allocated, "live_slots": live, "running": running, "waiting": waiting},
    }


def preallocation(work: list[tuple[list[int], int]], budget_slots: int, max_model_len: int) -> dict:
    """Max-length pre-allocation, computed from the workload (arithmetic, not a run)."""
    return {"concurrency": budget_slots // max_model_len,
            "live_share": sum(len(p) + o for p, o in work) / (len(work) * max_model_len),
            "computed_from": "workload arithmetic: each request reserves max_model_len slots"}


def hf_static_cache(model_path: str, max_cache_len: int, batch: int = 2, dtype=torch.float32) -> dict:
    """Build a `transformers.StaticCache` for the model and fill it by one forward pass of the
    HF model on `batch` 4-token prompts; measure its K/V tensor bytes per sequence."""
    import transformers
    from transformers import AutoModelForCausalLM, StaticCache

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    config = model.config
    cache = StaticCache(config=config, max_cache_len=max_cache_len)
    import inspect

    # transformers 5.x names the argument `cache` (`past_key_values` is deprecated), 4.x `past_key_values`.
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        model(torch.ones(batch, 4, dtype=torch.long), use_cache=True, **{name: cache})
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    total = sum(t.numel() * t.element_size() for t in tensors)
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    formula = 2 * config.num_hidden_layers * num_kv_heads * head_dim * max_cache_len * torch.finfo(dtype).bits // 8
    return {"transformers_version": transformers.__version__, "max_cache_len": max_cache_len, "batch": batch,
            "dtype": str(dtype).replace("torch.", ""), "num_tensors": len(tensors),
            "tensor_shape": list(tensors[0].shape), "bytes_total": total, "bytes_per_sequence": total // batch,
            "bytes_per_sequence_formula": formula, "num_layers": config.num_hidden_layers,
            "num_kv_heads": num_kv_heads, "head_dim": head_dim}


def quire_bytes_per_slot(llm) -> tuple[int, str]:
    """K+V bytes of one token slot, all layers: measured on the in-process worker's KV pool
    when reachable, else from the model's shape."""
    engine = llm.engine
    worker = getattr(engine.executor, "worker", None)
    pool = getattr(getattr(worker, "runner", None), "kv_pool", None)
    if pool is not None:
        nbytes = sum(t.numel() * t.element_size() for pair in pool.caches for t in pair)
        return nbytes // (pool.num_blocks * pool.block_size), "measured on the worker's KV pool tensors"
    c = engine.info.hf_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return (2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * torch.finfo(getattr(torch, engine.info.dtype)).bits // 8,
            "from the model's shape")


def run(args, model_path: str) -> dict:
    """Run every selected workload through quire and compare; returns the report."""
    from quire.cluster import LLM

    num_blocks = args.budget_slots // args.block_size
    llm = LLM(model=model_path, dtype="float32", num_kv_blocks=num_blocks, block_size=args.block_size,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.max_model_len, enable_prefix_caching=False, seed=args.seed)
    try:
        tok = llm.get_tokenizer()
        special = set(getattr(tok, "all_special_ids", []) or []) | set(llm.engine.info.eos_token_ids)
        allowed = [t for t in range(llm.engine.info.vocab_size) if t not in special]
        slot_bytes, slot_bytes_source = quire_bytes_per_slot(llm)
        budget_slots = llm.engine.kv.pool.num_blocks * llm.engine.kv.block_size
        hf = hf_static_cache(model_path, args.max_model_len, args.hf_batch)
        hf["budget_bytes"] = budget_slots * slot_bytes
        hf["concurrency"] = hf["budget_bytes"] // hf["bytes_per_sequence"]
        counts = {"short": args.num_short, "medium": args.num_medium, "long": args.num_long, "mixed": args.num_mixed}
        results = {}
        for name in args.workloads:
            work = make_workload(name, counts[name], args.seed, allowed, args.specs)
            lengths = [len(p) + o for p, o in work]
            print(f"[memory] {name}: {len(work)} requests, {sum(lengths)} tokens ...", file=sys.stderr, flush=True)
            quire = run_quire(llm, work)
            pre = preallocation(work, budget_slots, args.max_model_len)
            results[name] = {
                "num_requests": len(work), "mean_final_len": sum(lengths) / len(lengths),
                "prompt_tokens": sum(len(p) for p, _ in work), "output_tokens": sum(o for _, o in work),
                "quire": quire, "preallocation": pre,
                "hf_static": {"concurrency": hf["concurrency"], "live_share": pre["live_share"]},
                "ratio_vs_preallocation": quire["mean_concurrency"] / max(pre["concurrency"], 1),
                "ratio_vs_hf_static": quire["mean_concurrency"] / max(hf["concurrency"], 1),
                # The ratio with every slot holding a request at its final length: concurrency is at
                # most budget / live length per request, so >= 20x needs lengths of ~max_model_len / 20.
                "length_ratio": args.max_model_len / (sum(lengths) / len(lengths)),
            }
            print(f"[memory] {name}: done in {quire['wall_seconds']:.1f}s", file=sys.stderr, flush=True)
    finally:
        llm.shutdown()
    kv_dtypes = (memory_dtypes.run_dtypes(args, model_path, run_quire, make_workload, allowed, results)
                 if args.kv_cache_dtypes else None)
    goals = {"live_share_mixed_min": GOAL_LIVE_MIXED, "ratio_vs_preallocation_min": GOAL_RATIO}
    if "mixed" in results:
        goals["live_share_mixed"] = results["mixed"]["quire"]["live_share"]
        goals["live_share_mixed_met"] = goals["live_share_mixed"] >= GOAL_LIVE_MIXED
    goals["ratio_met"] = {n: r["ratio_vs_preallocation"] >= GOAL_RATIO for n, r in results.items()}
    goals["length_ratio"] = {n: r["length_ratio"] for n, r in results.items()}
    config = {k: v for k, v in vars(args).items() if k not in ("out", "plot", "specs")}
    config.update(model=model_path, budget_slots=budget_slots, num_kv_blocks=budget_slots // args.block_size,
                  enable_prefix_caching=False, dtype="float32", specs={k: list(v) for k, v in args.specs.items()},
                  quire_bytes_per_slot=slot_bytes, quire_bytes_per_slot_source=slot_bytes_source,
                  torch_threads=torch.get_num_threads(), argv=sys.argv[1:])
    return {"config": config, "hf_static_cache": hf, "results": results, "goals": goals, "kv_dtypes": kv_dtypes}


def format_table(report: dict) -> str:
    """The compact printed summary."""
    cfg, hf = report["config"], report["hf_static_cache"]
    lines = [(f"KV budget {cfg['budget_slots']} slots ({cfg['num_kv_blocks']} blocks x {cfg['block_size']}, "
              f"{cfg['budget_slots'] * cfg['quire_bytes_per_slot'] / 2**20:.1f} MiB), max_model_len {cfg['max_model_len']}; "
              f"HF StaticCache {hf['tensor_shape']} x {hf['num_tensors']}: {hf['bytes_per_sequence']} B/seq "
              f"(formula {hf['bytes_per_sequence_formula']}) -> {hf['concurrency']} seqs"),
             ("conc: running requests, mean over steps / while requests wait / peak; ratio: quire mean over "
              "pre-allocation; len ratio: max_model_len / mean length"),
             (f"{'workload':<9}{'reqs':>5}{'mean len':>9}{'live quire':>11}{'live prealloc':>14}{'conc quire':>17}"
              f"{'prealloc':>9}{'HF static':>10}{'ratio':>7}{'len ratio':>10}{'preempt':>8}{'steps':>6}{'wall s':>7}")]
    for name, r in report["results"].items():
        q = r["quire"]
        busy = q["mean_concurrency_while_waiting"]
        conc = f"{q['mean_concurrency']:.0f}/{'-' if busy is None else f'{busy:.0f}'}/{q['peak_concurrency']}"
        lines.append(f"{name:<9}{r['num_requests']:>5}{r['mean_final_len']:>9.0f}{q['live_share']:>11.1%}"
                     f"{r['preallocation']['live_share']:>14.1%}{conc:>17}"
                     f"{r['preallocation']['concurrency']:>9}{r['hf_static']['concurrency']:>10}"
                     f"{r['ratio_vs_preallocation']:>6.1f}x{r['length_ratio']:>9.1f}x"
                     f"{q['preemptions']:>8}{q['steps']:>6}{q['wall_seconds']:>7.1f}")
    g = report["goals"]
    if "live_share_mixed" in g:
        lines.append(f"goal live >= {g['live_share_mixed_min']:.0%} on mixed: {g['live_share_mixed']:.1%} "
                     f"({'met' if g['live_share_mixed_met'] else 'NOT met'})")
    met = ", ".join(f"{n} {'met' if ok else 'NOT met'}" for n, ok in g["ratio_met"].items())
    lines.append(f"goal >= {g['ratio_vs_preallocation_min']:.0f}x pre-allocation concurrency: {met}")
    if report.get("kv_dtypes"):
        lines.append(memory_dtypes.format_table(report["kv_dtypes"]))
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """Per workload: live share (quire vs pre-allocation) and concurrency (quire mean/peak,
    pre-allocation, HF static; log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["results"])
    res = report["results"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(names))
    series1 = [("quire (measured)", [res[n]["quire"]["live_share"] * 100 for n in names]),
               ("max-length pre-allocation", [res[n]["preallocation"]["live_share"] * 100 for n in names])]
    for i, (label, values) in enumerate(series1):
        bars = ax1.bar([j + (i - 0.5) * 0.4 for j in x], values, 0.4, label=label)
        ax1.bar_label(bars, fmt="%.1f", fontsize=7)
    ax1.set(xticks=list(x), xticklabels=names, ylabel="live / allocated KV slots (%)", ylim=(0, 125),
            title="KV slots holding live tokens")
    ax1.legend(fontsize=8, loc="upper center", ncol=2)
    series2 = [("quire mean", [res[n]["quire"]["mean_concurrency"] for n in names]),
               ("quire peak", [res[n]["quire"]["peak_concurrency"] for n in names]),
               ("max-length pre-allocation", [res[n]["preallocation"]["concurrency"] for n in names]),
               ("HF StaticCache", [res[n]["hf_static"]["concurrency"] for n in names])]
    for i, (label, values) in enumerate(series2):
        bars = ax2.bar([j + (i - 1.5) * 0.2 for j in x], [max(v, 0.5) for v in values], 0.2, label=label)
        ax2.bar_label(bars, labels=[f"{v:.0f}" for v in values], fontsize=7)
    ax2.set_yscale("log")
    ax2.set_ylim(top=max(max(v) for _, v in series2) * 8)
    ax2.set(xticks=list(x), xticklabels=names, ylabel="requests running at once",
            title="Concurrency under the same KV budget")
    ax2.legend(fontsize=8, loc="upper center", ncol=2)
    cfg = report["config"]
    fig.suptitle(f"KV budget {cfg['budget_slots']} slots, max_model_len {cfg['max_model_len']}, "
                 f"block {cfg['block_size']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None, specs: dict = SPECS) -> dict:
    """Run the benchmark; `specs` (prompt and output length ranges per class) is for tests."""
    args = parse_args(argv)
    args.specs = specs
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    bars_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # weight loading/saving bars are noise here
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="quire-memory-") as tmp:
            model_path = args.model or str(build_tiny_llama(Path(tmp), max(args.max_model_len, 8192)))
            report = run(args, model_path)
            if not args.model:
                report["config"]["model"] = "tiny random Llama built in a temp dir (hidden 64, 2 layers, 4 heads, 2 KV heads)"
    finally:
        if bars_on:
            hf_logging.enable_progress_bar()
    report["total_seconds"] = time.perf_counter() - started
    print(format_table(report))
    print(f"total {report['total_seconds']:.1f}s")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(report, args.plot)
    return report


if __name__ == "__main__":
    main()
