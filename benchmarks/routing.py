#!/usr/bin/env python
"""Data-parallel routing: what each routing policy saves on a multi-tenant, multi-turn workload.

The workload (seeded, the same for every policy): `--tenants` system prompts of
`--system-len` random tokens, each tenant its own cache salt; conversations start at Poisson
times, each picks a tenant uniformly and runs `--turns MIN:MAX` turns. A turn's prompt is
the conversation so far (system prompt, earlier user turns and the answers the model gave)
plus a new user turn of `--user-len MIN:MAX` tokens; the answer has `--output-len MIN:MAX`
tokens (EOS ignored). The next turn comes an exponential think time (mean `--think-s`)
after the answer ends (closed loop: a turn needs the answer before it).

Two parts, one JSON report (`<out>/routing.json`) and one chart (`<out>/routing.png`):

* **simulated** (no model): the router alone, in front of N simulated replicas, N in
  `--replicas` (1 to 64). Each replica is a real `BlockPool` (publishing KV events), a real
  `KVCacheManager` sharing the deployment's hash seed and a real `Scheduler`; a small
  simulated worker answers each plan with the conversation's predetermined answer tokens.
  Time is simulated: a step lasts `--sim-step-ms` plus `--sim-token-us` per scheduled
  token, replicas step independently, and after every step a replica's drained KV events
  go to the router's `PrefixMirror`. The workload grows with N (`--sim-conversations-per-replica`
  conversations at `--sim-rate-per-replica` conversation starts per second per replica).
  Per arrival the router hashes the prompt's blocks (at most `(len - 1) // block_size`:
  the last prompt token is always computed) and calls the policy's `choose` on the
  replicas' loads (live requests and queued prefill as the router counts them, KV usage as
  last published); that hash + choose is one *decision*, timed. Per N and policy:
  decisions per second, prefix hit rate (hit tokens / prompt tokens looked up, from the
  managers' counters), prefill tokens computed (looked up - hit, recomputation after a
  preemption included), simulated TTFT and balance. The **oracle** is one cache holding
  all KV: one `KVCacheManager` over a pool of all N replicas' blocks together, fed every
  request of the same run at its arrival and its end (prefix hits need no queueing there);
  its hit rate is the best any routing could reach with that total capacity. Pools: the
  oracle's is `--pool-slack` times the workload's working set (every system prompt and
  every conversation's whole history, in blocks), each replica gets 1/N of it. After each
  run, `decision_1k` times `--decision-samples` decisions for prompts of exactly
  `--decision-prompt-len` tokens (a tenant's system prompt and a random tail) against the
  replicas' final state.
* **dp2** (a tiny model, 2 CPU replicas): the real `Router` in front of two in-process
  replicas (each an `Engine` publishing KV events, one hash seed), once per policy with
  fresh replicas, driven in real time by a smaller workload (`--dp-*` flags). Per policy:
  prefix hit rate and prefill tokens computed (the replicas' own counters, a warm-up
  excluded), TTFT (submit to the first delta with tokens; mean, p50, p90), output tokens
  per second over the run's wall time, and the oracle fed the same requests. One run per
  `--dp-pool-slack` (the KV blocks across the replicas, and the oracle's, over the working
  set): the goals are read at the first, 0.6 by default (a cache somewhat smaller than every
  conversation ever held, as in service: round_robin must keep every system prompt on every
  replica and evicts), and 1.1 shows the gap closing when everything fits anywhere (with
  two replicas the oracle itself then computes about half of round_robin's prefill).

Goals checked and printed: cache_aware computes at most half the prefill tokens of
round_robin (dp2) and reaches a hit rate within 5% (relative) of the oracle (dp2, and per N
in the simulation); the router makes >= 5,000 decisions per second for 1k-token prompts at
64 replicas (cache_aware, the policy doing the most work per decision).

Unless `--model` is given, a tiny random Llama (hidden 64, 2 layers, 4 heads, 2 KV heads,
4096 positions, the tiny random model's tokenizer) is built into a temp dir: the
routing does not depend on the weights. Examples:

    python benchmarks/routing.py --out routing-report          # a few minutes on 2 CPU cores
    python benchmarks/routing.py --quick --out routing-quick    # seconds: tiny sizes
    python benchmarks/routing.py --skip-dp --out sim-only       # the simulation alone
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from quire.cluster.core.block_hash import new_hash_seed
from quire.cluster.serving.routing import POLICIES
from quire.protos.step import SamplingParams


def _sibling(name: str):
    """A sibling script of this folder, imported by path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


_sim = _sibling("routing_sim")  # the workload and the simulated deployment
_report = _sibling("routing_report")  # goals, summary, chart
check_goals, format_summary, plot = _report.check_goals, _report.format_summary, _report.plot
TOKEN_LOW, TOKEN_HIGH = _sim.TOKEN_LOW, _sim.TOKEN_HIGH
Conversation, Workload, Oracle = _sim.Conversation, _sim.Workload, _sim.Oracle
span, make_workload, percentile, simulate, decision_bench = (_sim.span, _sim.make_workload, _sim.percentile,
                                                             _sim.simulate, _sim.decision_bench)


def sim_workload(args, num_replicas: int) -> Workload:
    return make_workload(args.seed, args.tenants, args.system_len, args.sim_conversations_per_replica * num_replicas,
                         args.sim_rate_per_replica * num_replicas, args.turns, args.user_len, args.output_len,
                         args.think_s, args.block_size)


def run_simulated(args, seed: bytes) -> dict:
    runs: dict[str, dict[str, dict]] = {}
    decisions: dict[str, dict[str, dict]] = {}
    for n in args.replicas:
        workload = sim_workload(args, n)
        for name in args.policies:
            row, state = simulate(workload, n, name, args, seed)
            runs.setdefault(str(n), {})[name] = row
            decisions.setdefault(str(n), {})[name] = decision_bench(workload, state, args.decision_samples,
                                                                    args.decision_prompt_len, args.seed,
                                                                    args.decision_repeats)
            print(f"[routing] sim N={n:>2} {name:<13} hit {row['hit_rate']:6.1%} (oracle {row['oracle_hit_rate']:6.1%}) "
                  f"prefill {row['prefill_tokens']:>9,} decisions/s {row['decisions_per_s']:>9,.0f} "
                  f"(1k prompts {decisions[str(n)][name]['decisions_per_s']:>9,.0f}) "
                  f"preempt {row['preemptions']:>4} wall {row['wall_seconds']:5.1f}s", file=sys.stderr, flush=True)
    return {"runs": runs, "decision_1k": decisions}


# -- the real part: DP=2, a tiny model ------------------------------------------------------------
def build_tiny_llama(directory: Path, max_position_embeddings: int = 4096, tokenizer_dir: Path | None = None) -> Path:
    """A random tiny Llama (see `quire.cluster.tools.default_model.build_tiny_llama`)."""
    from quire.cluster.tools.default_model import build_tiny_llama as build

    return build(directory, max_position_embeddings, tokenizer_dir)


def dp_workload(args) -> Workload:
    return make_workload(args.seed + 1, args.tenants, args.system_len, args.dp_conversations, args.dp_rate,
                         args.dp_turns, args.user_len, args.dp_output_len, args.dp_think_s, args.block_size)


async def dp_run(args, model_path: str, policy_name: str, workload: Workload, pool_slack: float) -> dict:
    """The workload through the Router over `--dp-size` fresh in-process replicas, in real time,
    with `pool_slack` times the working set in KV blocks across them."""
    from quire.cluster.core.config import EngineConfig
    from quire.cluster.core.engine import Engine
    from quire.cluster.serving.replica import InprocReplica, ReplicaHost
    from quire.cluster.serving.router import Router, served_model

    seed = new_hash_seed()
    size = workload.block_size
    oracle_blocks = max(math.ceil(pool_slack * workload.working_set_blocks()), 1)
    per_replica = max(math.ceil(oracle_blocks / args.dp_size), 2 * -(-workload.max_len() // size))
    engine_kwargs = dict(model=model_path, dtype="float32", kv_events=True, hash_seed=seed, num_kv_blocks=per_replica,
                         block_size=size, max_model_len=args.dp_max_model_len,
                         max_num_batched_tokens=args.dp_max_num_batched_tokens, max_num_seqs=args.dp_max_num_seqs)
    replicas = [InprocReplica(f"r{i}", ReplicaHost.build(Engine(EngineConfig.from_kwargs(**engine_kwargs))))
                for i in range(args.dp_size)]
    model = served_model(engine_kwargs, per_replica)
    router = Router(replicas, model, seed, policy=policy_name)
    router.start()
    oracle = Oracle(per_replica * args.dp_size, size, bytes.fromhex(seed))
    ttft: list[float] = []
    output_tokens = 0
    try:
        # Warm-up (untimed, not counted): two short requests per replica, unrelated tokens and salts.
        rng = random.Random(f"warm-up/{args.seed}")
        warm = [([rng.randrange(TOKEN_LOW, TOKEN_HIGH) for _ in range(40)], f"warm-{i}") for i in range(2 * args.dp_size)]

        async def one(prompt, salt, request_id, max_tokens):
            async for _ in router.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                                           request_id, cache_salt=salt):
                pass

        await asyncio.gather(*(one(p, s, f"warm-{i}", 4) for i, (p, s) in enumerate(warm)))
        before = [await r.inspect() for r in replicas]

        async def conversation(conv: Conversation, origin: float) -> None:
            nonlocal output_tokens
            await asyncio.sleep(max(0.0, origin + conv.start_s - time.perf_counter()))
            history = list(workload.system_prompts[conv.tenant])
            salt = workload.salt(conv.tenant)
            for index, turn in enumerate(conv.turns):
                prompt = history + turn.user
                request_id = f"c{conv.cid}t{index}"
                params = SamplingParams(max_tokens=turn.output_len, temperature=0, ignore_eos=True)
                oracle.arrive(request_id, prompt, salt)
                submitted, first, tokens = time.perf_counter(), None, []
                async for delta in router.generate(prompt, params, request_id, cache_salt=salt):
                    new = [t for out in delta.outputs for t in out.token_ids]
                    if new and first is None:
                        first = time.perf_counter()
                        ttft.append(first - submitted)
                    tokens.extend(new)
                output_tokens += len(tokens)
                oracle.finish(request_id, tokens)
                history = prompt + tokens
                if index + 1 < len(conv.turns):
                    await asyncio.sleep(turn.think_s)

        origin = time.perf_counter()
        await asyncio.gather(*(conversation(c, origin) for c in workload.conversations))
        wall = time.perf_counter() - origin
        after = [await r.inspect() for r in replicas]
    finally:
        router.shutdown()
        for replica in replicas:
            await replica.shutdown()
    query = sum(a.num_query_tokens - b.num_query_tokens for a, b in zip(after, before))
    hit = sum(a.num_hit_tokens - b.num_hit_tokens for a, b in zip(after, before))
    per_replica_query = [a.num_query_tokens - b.num_query_tokens for a, b in zip(after, before)]
    oracle_report = oracle.report()
    return {
        "policy": policy_name, "requests": workload.num_requests, "blocks_per_replica": per_replica,
        "hit_rate": hit / query if query else 0.0, "looked_up_tokens": query, "hit_tokens": hit,
        "prefill_tokens": query - hit, "looked_up_tokens_per_replica": per_replica_query,
        "oracle_hit_rate": oracle_report["hit_rate"], "oracle_prefill_tokens": oracle_report["prefill_tokens"],
        "hit_rate_vs_oracle": (hit / query) / oracle_report["hit_rate"] if query and oracle_report["hit_rate"] else None,
        "ttft_s_mean": statistics.fmean(ttft) if ttft else None, "ttft_s_p50": percentile(ttft, 0.5),
        "ttft_s_p90": percentile(ttft, 0.9), "output_tokens": output_tokens, "wall_seconds": wall,
        "output_tokens_per_s": output_tokens / wall if wall else None,
        "router_predicted_cached_tokens": getattr(getattr(router, "counters", None), "predicted_cached_tokens", None),
    }


def run_dp(args, model_path: str) -> dict:
    workload = dp_workload(args)
    if workload.max_len() > args.dp_max_model_len:
        raise SystemExit(f"the dp workload's longest conversation has {workload.max_len()} tokens, over "
                         f"--dp-max-model-len {args.dp_max_model_len}")
    by_slack: dict[str, dict] = {}
    for slack in args.dp_pool_slack:
        results = by_slack[str(slack)] = {}
        for name in args.policies:
            results[name] = asyncio.run(dp_run(args, model_path, name, workload, slack))
            row = results[name]
            print(f"[routing] dp{args.dp_size} slack {slack} {name:<13} hit {row['hit_rate']:6.1%} "
                  f"(oracle {row['oracle_hit_rate']:6.1%}) prefill {row['prefill_tokens']:>8,} "
                  f"TTFT p50 {row['ttft_s_p50']:.3f}s {row['output_tokens_per_s']:.1f} tok/s "
                  f"wall {row['wall_seconds']:.1f}s", file=sys.stderr, flush=True)
    results = by_slack[str(args.dp_pool_slack[0])]
    return {"workload": {"conversations": len(workload.conversations), "requests": workload.num_requests,
                         "prompt_tokens": workload.prompt_tokens(),
                         "working_set_blocks": workload.working_set_blocks(), "max_len": workload.max_len(),
                         "note": (f"scaled down for a CPU run: {len(workload.conversations)} conversations of "
                                  f"{args.dp_turns[0]}-{args.dp_turns[1]} turns at {args.dp_rate}/s, answers of "
                                  f"{args.dp_output_len[0]}-{args.dp_output_len[1]} tokens, think {args.dp_think_s} s "
                                  f"(the simulation: {args.sim_conversations_per_replica} conversations per replica "
                                  f"of {args.turns[0]}-{args.turns[1]} turns, answers of {args.output_len[0]}-"
                                  f"{args.output_len[1]} tokens, think {args.think_s} s); same tenants, system "
                                  "prompts and user turn lengths"),
                         "pool_slack": args.dp_pool_slack[0]},
            "results": results, "by_pool_slack": by_slack}


# -- report -----------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="directory for routing.json and routing.png (created)")
    p.add_argument("--model", help="checkpoint for the DP run (default: build a tiny random Llama)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: seconds (the smoke test)")
    p.add_argument("--skip-dp", action="store_true", help="the simulation only")
    p.add_argument("--skip-sim", action="store_true", help="the DP run only")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset of " + ",".join(POLICIES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--pool-slack", type=float, default=1.1, help="the oracle's blocks over the working set")
    # The workload (both parts).
    p.add_argument("--tenants", type=int, default=16, help="system prompts (one cache salt each)")
    p.add_argument("--system-len", type=int, default=1000, help="tokens of each system prompt")
    p.add_argument("--turns", type=span, default=(2, 4), help="turns per conversation MIN:MAX (simulation)")
    p.add_argument("--user-len", type=span, default=(32, 128), help="tokens of a user turn MIN:MAX")
    p.add_argument("--output-len", type=span, default=(32, 128), help="tokens of an answer MIN:MAX (simulation)")
    p.add_argument("--think-s", type=float, default=2.0, help="mean pause between an answer and the next turn (simulation)")
    # The simulation.
    p.add_argument("--replicas", default="1,2,4,8,16,32,64", help="comma-separated replica counts to simulate")
    p.add_argument("--sim-conversations-per-replica", type=int, default=16)
    p.add_argument("--sim-rate-per-replica", type=float, default=0.5, help="conversation starts per second per replica")
    p.add_argument("--sim-step-ms", type=float, default=15.0, help="simulated step time: fixed part")
    p.add_argument("--sim-token-us", type=float, default=40.0, help="simulated step time: per scheduled token")
    p.add_argument("--sim-max-num-seqs", type=int, default=64)
    p.add_argument("--sim-max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--decision-samples", type=int, default=2000, help="decisions timed per N and policy")
    p.add_argument("--decision-prompt-len", type=int, default=1024)
    p.add_argument("--decision-repeats", type=int, default=3, help="timed passes over the samples (median reported)")
    # The real DP run.
    p.add_argument("--dp-size", type=int, default=2)
    p.add_argument("--dp-conversations", type=int, default=64)
    p.add_argument("--dp-rate", type=float, default=4.0, help="conversation starts per second")
    p.add_argument("--dp-turns", type=span, default=(2, 4))
    p.add_argument("--dp-output-len", type=span, default=(32, 128))
    p.add_argument("--dp-pool-slack", default="0.6,1.1",
                   help="KV blocks across the replicas (and the oracle's) over the working set, one run per value; "
                        "the goals are checked at the first (a cache a little smaller than every conversation ever "
                        "held, as in service), the others show how the gap closes when everything fits")
    p.add_argument("--dp-think-s", type=float, default=0.2)
    p.add_argument("--dp-max-model-len", type=int, default=2048)
    p.add_argument("--dp-max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--dp-max-num-seqs", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads for the DP run")
    args = p.parse_args(argv)
    if args.quick:
        args.replicas = "1,2,4"
        args.tenants, args.system_len, args.block_size = 4, 96, 16
        args.user_len, args.output_len, args.turns = (8, 24), (4, 12), (2, 3)
        args.sim_conversations_per_replica, args.decision_samples, args.decision_prompt_len = 6, 100, 128
        args.decision_repeats = 1
        args.dp_conversations, args.dp_rate, args.dp_turns, args.dp_output_len = 8, 50.0, (2, 2), (2, 4)
        args.dp_think_s, args.dp_max_model_len, args.dp_pool_slack = 0.0, 512, "1.1"
    args.replicas = sorted({int(n) for n in str(args.replicas).split(",") if n.strip()})
    args.dp_pool_slack = [float(v) for v in str(args.dp_pool_slack).split(",") if v.strip()]
    if not args.dp_pool_slack or any(v <= 0 for v in args.dp_pool_slack):
        p.error("--dp-pool-slack takes positive numbers")
    args.policies = [name.strip() for name in args.policies.split(",") if name.strip()]
    if unknown := set(args.policies) - set(POLICIES):
        p.error(f"unknown policies: {sorted(unknown)}")
    if any(n < 1 for n in args.replicas):
        p.error("replica counts must be positive")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "out"}
    config["argv"] = sys.argv[1:] if argv is None else list(argv)
    report: dict = {"config": config, "machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()}}
    seed = bytes.fromhex(new_hash_seed())
    if not args.skip_sim:
        report["simulated"] = run_simulated(args, seed)
        report["simulated"]["step_model"] = (f"{args.sim_step_ms} ms + {args.sim_token_us} us per scheduled token "
                                             "(simulated time)")
    if args.skip_dp:
        report["dp2"] = {"skipped": "--skip-dp"}
    else:
        import torch

        torch.set_num_threads(args.threads)
        try:
            import quire.cluster.serving.router  # noqa: F401
        except ImportError as error:
            report["dp2"] = {"skipped": f"the router is not available: {error}"}
        else:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            with tempfile.TemporaryDirectory(prefix="quire-routing-") as tmp:
                model_path = args.model or str(build_tiny_llama(Path(tmp), max(args.dp_max_model_len, 4096)))
                report["dp2"] = run_dp(args, model_path)
            report["dp2"]["model"] = args.model or ("tiny random Llama built in a temp dir "
                                                     "(hidden 64, 2 layers, 4 heads, 2 KV heads)")
            report["dp2"]["torch_threads"] = torch.get_num_threads()
    report["machine"]["load_average_at_end"] = os.getloadavg()
    report["goals"] = check_goals(report)
    report["total_seconds"] = time.perf_counter() - started
    print(format_summary(report))
    print(f"total {report['total_seconds']:.1f}s; load average (1 min) {report['machine']['load_average_at_start'][0]:.1f} "
          f"at start, {report['machine']['load_average_at_end'][0]:.1f} at end on {os.cpu_count()} CPUs "
          "(decision rates are wall-clock timings: compare them on a quiet machine)")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "routing.json").write_text(json.dumps(report, indent=1))
        plot(report, out / "routing.png")
    return report


if __name__ == "__main__":
    main()
