"""Migration between replicas: N live streams, one replica killed mid-way, nothing lost or repeated.

Two in-process replicas behind the router (the Ray actors carry the same `ReplicaHost`;
see tests/test_ray_replicas.py for that path). The same workload runs twice through fresh
routers: undisturbed, then with replica r0 killed once the streams have received
`--kill-after` tokens between them. Every stream (greedy and seeded, half each) is
compared token by token with its undisturbed run: a stream that got fewer tokens lost
some, more duplicated some, different ones diverged. Also reported: how many samples
moved, and the time from the kill to the first token of each moved stream.

    python benchmarks/migration.py --streams 64 --out results/
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

from quire.cluster.core.block_hash import new_hash_seed
from quire.cluster.core.config import EngineConfig
from quire.cluster.core.engine import Engine
from quire.cluster.serving.replica import InprocReplica, ReplicaHost
from quire.cluster.serving.router import Router, served_model
from quire.protos.step import SamplingParams


def build_router(engine_kwargs: dict, num_replicas: int) -> Router:
    seed = new_hash_seed()
    kwargs = {**engine_kwargs, "hash_seed": seed, "kv_events": True}
    replicas = [InprocReplica(f"r{i}", ReplicaHost.build(Engine(EngineConfig.from_kwargs(**kwargs))))
                for i in range(num_replicas)]
    return Router(replicas, served_model(kwargs, replicas[0].host.async_engine.model.num_kv_blocks), seed,
                  policy="round_robin", poll_seconds=0.02)


def workload(num_streams: int, output_len: int) -> list[tuple[str, SamplingParams]]:
    cases = []
    for index in range(num_streams):
        prompt = f"Stream {index}: the story of a river that ran uphill, part {index % 7}, begins"
        params = (SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True) if index % 2 == 0 else
                  SamplingParams(max_tokens=output_len, temperature=0.9, top_p=0.95, seed=index, ignore_eos=True))
        cases.append((prompt, params))
    return cases


async def run(engine_kwargs: dict, cases, num_replicas: int, kill_after: int | None) -> dict:
    router = build_router(engine_kwargs, num_replicas)
    router.start()
    tokens: list[list[int]] = [[] for _ in cases]
    state = {"received": 0, "killed_at": None}
    moved_first_token: dict[int, float] = {}
    on_victim: set[int] = set()

    async def one(index: int, prompt: str, params: SamplingParams) -> None:
        async for delta in router.generate(prompt, params, f"s{index}"):
            new = [t for c in delta.outputs for t in c.token_ids]
            tokens[index].extend(new)
            state["received"] += len(new)
            if state["killed_at"] is not None and index in on_victim and new and index not in moved_first_token:
                moved_first_token[index] = time.perf_counter() - state["killed_at"]
            if kill_after is not None and state["killed_at"] is None and state["received"] >= kill_after:
                on_victim.update(int(p.stream.request_id[1:]) for p in router._placements.values()
                                 if p.replica_id == "r0")
                state["killed_at"] = time.perf_counter()
                router.handle("r0").kill("killed by the benchmark")

    started = time.perf_counter()
    try:
        await asyncio.gather(*(one(i, prompt, params) for i, (prompt, params) in enumerate(cases)))
        survivors = {r: await router.handle(r).inspect() for r in router.replica_ids()}
    finally:
        router.shutdown()
    return {"tokens": tokens, "seconds": time.perf_counter() - started, "migrations": router.counters.migrations,
            "moved_streams": len(on_victim), "leaked_blocks": sum(i.num_blocks - i.num_free_blocks
                                                                   for i in survivors.values()),
            "kill_to_first_token_ms": sorted(1e3 * s for s in moved_first_token.values())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=48)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--kill-after", type=int, default=None,
                        help="tokens received in all before r0 is killed (default: a third of the total)")
    parser.add_argument("--num-kv-blocks", type=int, default=1024)
    parser.add_argument("--out", default=None, help="directory for migration.json")
    args = parser.parse_args(argv)
    if args.model is None:
        from quire.cluster.tools.default_model import default_model_dir

        args.model = str(default_model_dir())
    engine_kwargs = dict(model=args.model, dtype="float32", num_kv_blocks=args.num_kv_blocks,
                         max_num_seqs=args.streams)
    cases = workload(args.streams, args.output_len)
    kill_after = args.kill_after if args.kill_after is not None else args.streams * args.output_len // 3
    undisturbed = asyncio.run(run(engine_kwargs, cases, args.replicas, None))
    disturbed = asyncio.run(run(engine_kwargs, cases, args.replicas, kill_after))
    lost = duplicated = diverged = exact = 0
    for want, got in zip(undisturbed["tokens"], disturbed["tokens"]):
        lost += max(0, len(want) - len(got))
        duplicated += max(0, len(got) - len(want))
        diverged += int(want != got and len(want) == len(got))
        exact += int(want == got)
    delays = disturbed["kill_to_first_token_ms"]
    report = {
        "streams": args.streams, "output_len": args.output_len, "replicas": args.replicas, "kill_after": kill_after,
        "moved_streams": disturbed["moved_streams"], "migrated_samples": disturbed["migrations"],
        "streams_exact": exact, "tokens_lost": lost, "tokens_duplicated": duplicated, "streams_diverged": diverged,
        "blocks_leaked_on_survivors": disturbed["leaked_blocks"],
        "kill_to_first_token_ms": {"median": statistics.median(delays) if delays else None,
                                   "max": max(delays) if delays else None},
        "seconds": {"undisturbed": undisturbed["seconds"], "disturbed": disturbed["seconds"]},
        "goal": {"no_token_lost_or_duplicated": lost == 0 and duplicated == 0 and exact == args.streams},
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "migration.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
