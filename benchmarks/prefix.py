#!/usr/bin/env python
"""Prefix caching: what a shared system prompt saves, and what caching costs when nothing is shared.

Two offline workloads on the same engine settings, each run with prefix caching on and
off, interleaved `--repeats` times (medians reported; this kind of machine drifts):

* shared: every request is one `--system-len`-token system prompt plus its own user turn
  (`--user-len` tokens), greedy, `--output-len` tokens out.
* unique: prompts of the same total length with nothing in common (zero cache hits).

Reported per run: wall seconds, output tokens/s, prompt tokens computed (measured: every
token the scheduler sent to the model, minus the decode steps), prefix-cache hit tokens,
and the controller's time inside prefix caching (hashing, lookups, registering and
evicting cached blocks)
as a share of the wall time — the noise-free form of the zero-hit overhead. Greedy tokens
are compared between on and off (they must be identical).

A third workload measures the host-memory tier (`--kv-host-memory`): `--conversations`
multi-turn conversations, each with a `--conversation-prefix-len`-token opening of its own,
take `--turns` turns in order (each turn: the whole history plus `--user-len` new tokens,
greedy, `--turn-output-len` tokens out), on a device pool of `--tier-device-blocks` blocks
that holds a quarter of the reused prefixes (by default), with and without a host tier of
`--tier-host-memory` bytes. Each conversation comes back after the others pushed its blocks
out of the device pool, so without the tier every turn recomputes its history. Reported:
prefill tokens computed, hit rate per tier (device, host), blocks offloaded and loaded back,
time to first token per turn (mean, p50, p90; one request at a time, so it is the turn's
prefill time), and whether the greedy tokens are identical. Goal: the tier cuts prefill
tokens by >= 70%.

    python benchmarks/prefix.py --num-requests 64 --out prefix.json
"""
from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import time

import torch

from quire.cluster import LLM, SamplingParams
from quire.cluster.core.kv_cache_manager import KVCacheManager


def workloads(args, repeat: int) -> dict[str, list[list[int]]]:
    """Fresh prompts for every repeat (a new system prompt too): nothing one repeat cached
    can help the next."""
    rng = random.Random(f"{args.seed}/{repeat}")
    low, high = 3, 2000  # away from the special ids, inside any vocabulary quire's tests build

    def tokens(count):
        return [rng.randrange(low, high) for _ in range(count)]

    system = tokens(args.system_len)
    return {"shared": [system + tokens(args.user_len) for _ in range(args.num_requests)],
            "unique": [tokens(args.system_len + args.user_len) for _ in range(args.num_requests)]}


class PrefixTimer:
    """Accumulates the wall time spent in prefix caching: KVCacheManager's hashing, lookups
    and block registration (the decode fast path's `_hash_block` too) and the block pool's
    recording and eviction of cached content."""

    METHODS = ("block_hashes", "_hash_block", "get_computed_blocks", "_register", "cache_computed_blocks")
    POOL_METHODS = ("cache", "_evict", "lookup")

    def __init__(self):
        self.seconds = 0.0
        self._depth = 0

    @classmethod
    def _targets(cls, kv: KVCacheManager):
        """(object, method name) of every method timed."""
        for owner, names in ((kv, cls.METHODS), (kv.pool, cls.POOL_METHODS)):
            for name in names:
                yield owner, name

    def wrap(self, kv: KVCacheManager) -> None:
        for owner, name in self._targets(kv):
            setattr(owner, name, self._timed(getattr(owner, name)))

    @classmethod
    def unwrap(cls, kv: KVCacheManager) -> None:
        for owner, name in cls._targets(kv):
            owner.__dict__.pop(name, None)

    def _timed(self, method):
        @functools.wraps(method)
        def timed(*args, **kwargs):
            self._depth += 1
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:  # nested calls count once
                    self.seconds += time.perf_counter() - started
        return timed


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[dict, list[list[int]]]:
    engine = llm.engine
    kv = engine.kv
    hits_before = kv.num_hit_tokens
    scheduled = [0]
    schedule = engine.scheduler.schedule

    def counting_schedule():
        plan = schedule()
        scheduled[0] += plan.total_num_scheduled_tokens
        return plan

    engine.scheduler.schedule = counting_schedule
    timer = PrefixTimer()
    if kv.enable_prefix_caching:
        timer.wrap(kv)
    try:
        began = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - began
    finally:
        engine.scheduler.schedule = schedule
        PrefixTimer.unwrap(kv)
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    # Every output but the last of each request came out of a one-token decode step.
    decode_tokens = generated - len(prompts)
    return {"wall_seconds": wall, "output_tokens_per_s": generated / wall,
            "prompt_tokens": sum(len(p) for p in prompts),
            "prompt_tokens_computed": scheduled[0] - decode_tokens,
            "prefix_hit_tokens": kv.num_hit_tokens - hits_before,
            "prefix_caching_seconds": timer.seconds,
            "prefix_caching_share_of_wall": timer.seconds / wall}, [o.outputs[0].token_ids for o in outputs]


def conversation_turns(llm: LLM, args) -> dict:
    """The host-tier workload on one engine (see the module docstring): prefill tokens, hits per
    tier, offloads and loads, TTFT per turn (seconds), and the greedy tokens of every turn."""
    engine, kv = llm.engine, llm.engine.kv
    rng = random.Random(f"{args.seed}/conversations")
    low, high = 3, 2000

    def tokens(count):
        return [rng.randrange(low, high) for _ in range(count)]

    histories = [tokens(args.conversation_prefix_len) for _ in range(args.conversations)]
    params = SamplingParams(temperature=0, max_tokens=args.turn_output_len, ignore_eos=True)
    before = (kv.num_query_tokens, kv.num_hit_tokens, kv.num_host_hit_tokens, kv.num_offloaded_blocks,
              kv.num_loaded_blocks)
    ttft, outputs = [], []
    began = time.perf_counter()
    for turn in range(args.turns):
        for index, history in enumerate(histories):
            prompt = history + tokens(args.user_len)
            request_id = f"turn{turn}-c{index}"
            submitted = time.perf_counter()
            engine.add_request(prompt, params, request_id=request_id)
            first, out = None, []
            while engine.has_unfinished():
                for output in engine.step():  # deltas: each step's new tokens
                    if output.request_id == request_id and output.outputs[0].token_ids:
                        first = first or time.perf_counter()
                        out.extend(output.outputs[0].token_ids)
            ttft.append(first - submitted)
            outputs.append(out)
            histories[index] = prompt + out
    wall = time.perf_counter() - began
    query, hit, host_hit, offloaded, loaded = (now - then for now, then in zip(
        (kv.num_query_tokens, kv.num_hit_tokens, kv.num_host_hit_tokens, kv.num_offloaded_blocks,
         kv.num_loaded_blocks), before))
    kv.check_integrity()
    ordered = sorted(ttft)
    return {"wall_seconds": wall, "prompt_tokens": query, "prefill_tokens": query - hit,
            "hit_rate": hit / query, "device_hit_rate": (hit - host_hit) / query, "host_hit_rate": host_hit / query,
            "offloaded_blocks": offloaded, "loaded_blocks": loaded,
            "reused_prefix_tokens": sum(len(h) for h in histories), "device_tokens": kv.pool.num_blocks * kv.block_size,
            "host_blocks": kv.cpu_pool.num_blocks if kv.host_tier else 0,
            "ttft_mean": statistics.mean(ttft), "ttft_p50": ordered[len(ordered) // 2],
            "ttft_p90": ordered[int(0.9 * (len(ordered) - 1))], "tokens": outputs}


def host_tier_report(args) -> dict:
    """The host-tier workload with and without the tier, on otherwise equal engines."""
    runs = {}
    for name, host_memory in (("without_tier", 0), ("with_tier", args.tier_host_memory)):
        llm = LLM(model=args.model, dtype="float32", block_size=16, num_kv_blocks=args.tier_device_blocks,
                  kv_host_memory=host_memory, max_num_batched_tokens=args.max_num_batched_tokens)
        try:
            llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up, untimed
            runs[name] = conversation_turns(llm, args)
        finally:
            llm.shutdown()
        print(json.dumps({"workload": "conversations", "run": name,
                          **{k: round(v, 4) for k, v in runs[name].items() if k != "tokens"}}), flush=True)
    tokens = {name: run.pop("tokens") for name, run in runs.items()}
    with_tier, without = runs["with_tier"], runs["without_tier"]
    return {"runs": runs, "summary": {
        "prefill_tokens_ratio": with_tier["prefill_tokens"] / without["prefill_tokens"],
        "prefill_tokens_cut": 1 - with_tier["prefill_tokens"] / without["prefill_tokens"],
        "reused_prefixes_over_device_pool": without["reused_prefix_tokens"] / without["device_tokens"],
        "ttft_mean_ratio": with_tier["ttft_mean"] / without["ttft_mean"],
        "identical_tokens": tokens["with_tier"] == tokens["without_tier"],
        "goals": {"prefill_tokens_cut": ">= 0.70"}}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--system-len", type=int, default=1024)
    parser.add_argument("--user-len", type=int, default=48)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--num-kv-blocks", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--conversation-prefix-len", type=int, default=512)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--turn-output-len", type=int, default=16)
    parser.add_argument("--tier-device-blocks", type=int, default=None,
                        help="device pool of the host-tier workload (default: a quarter of the openings)")
    parser.add_argument("--tier-host-memory", type=int, default=256 << 20, help="host tier bytes (per rank)")
    parser.add_argument("--skip-shared-unique", action="store_true", help="run only the host-tier workload")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.tier_device_blocks is None:
        # A quarter of the conversations' openings, but room for the longest conversation's last turn.
        last_turn = args.conversation_prefix_len + args.turns * (args.user_len + args.turn_output_len)
        args.tier_device_blocks = max(args.conversations * args.conversation_prefix_len // 16 // 4,
                                      -(-last_turn // 16) + 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"config": vars(args), "machine": {"torch_threads": torch.get_num_threads()}}
    if not args.skip_shared_unique:
        report.update(shared_and_unique(args))
    report["host_tier"] = host_tier_report(args)
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
    print(json.dumps({"summary": report.get("summary"), "host_tier": report["host_tier"]["summary"]}, indent=2))
    return report


def shared_and_unique(args) -> dict:
    """The shared-system-prompt and unique workloads, prefix caching on and off."""
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    common = dict(model=args.model, dtype="float32", num_kv_blocks=args.num_kv_blocks,
                  max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.num_requests)
    engines = {on: LLM(enable_prefix_caching=on, **common) for on in (True, False)}
    for llm in engines.values():  # warm-up, untimed
        llm.generate(workloads(args, -1)["unique"][:4], params, use_tqdm=False)
    runs: dict[tuple[str, bool], list[dict]] = {}
    tokens: dict[tuple[str, bool], list] = {}
    for repeat in range(args.repeats):
        prompts = workloads(args, repeat)
        for name in ("shared", "unique"):
            for on in (True, False):
                row, tokens[(name, on)] = run(engines[on], prompts[name], params)
                runs.setdefault((name, on), []).append(row)
                print(json.dumps({"workload": name, "prefix_caching": on, "repeat": repeat,
                                  **{k: round(v, 4) for k, v in row.items()}}), flush=True)
    results = {}
    for (name, on), rows in runs.items():
        results[f"{name}/{'on' if on else 'off'}"] = {
            key: statistics.median(row[key] for row in rows) for key in rows[0]} | {
            "wall_seconds_all": [row["wall_seconds"] for row in rows]}
    shared_on, shared_off = results["shared/on"], results["shared/off"]
    unique_on, unique_off = results["unique/on"], results["unique/off"]
    summary = {
        "shared_prefill_tokens_saved": 1 - shared_on["prompt_tokens_computed"] / shared_off["prompt_tokens_computed"],
        "shared_throughput_ratio": shared_on["output_tokens_per_s"] / shared_off["output_tokens_per_s"],
        "unique_wall_overhead": unique_on["wall_seconds"] / unique_off["wall_seconds"] - 1,
        "unique_prefix_caching_share_of_wall": unique_on["prefix_caching_share_of_wall"],
        "unique_hit_tokens": unique_on["prefix_hit_tokens"],
        "identical_tokens": {name: tokens[(name, True)] == tokens[(name, False)] for name in ("shared", "unique")},
        "goals": {"prefill_tokens_saved": ">= 0.80", "shared_throughput_ratio": ">= 2.0",
                  "zero_hit_overhead": "< 0.01"},
    }
    for llm in engines.values():
        llm.shutdown()
    return {"results": results, "summary": summary}


if __name__ == "__main__":
    main()
