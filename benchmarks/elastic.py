#!/usr/bin/env python
"""Elastic replicas under a load ramp: the autoscaler growing and shrinking the deployment.

The real `Router` with its autoscaler, in front of in-process replicas of a tiny model (each
an `Engine` publishing KV events, one hash seed; a replica factory builds and warms up a new
one when the autoscaler asks, as a Ray replica's `ready` does). Requests arrive at Poisson
times whose rate steps up and back down (`--steps RATE:SECONDS,...`, default
2:12,8:12,12:12,8:12,2:12,0.5:12 req/s); each has a ~20-token prompt of its own and
`--output-len MIN:MAX` greedy output tokens (EOS ignored). The autoscaler's windows are
shortened for a run of a minute or two (`--scale-up-s`, `--scale-down-s`, `--tick-s`,
`--target-ongoing`). After the last arrival the run goes on until every request has ended
and the deployment is back at `--min-replicas` (at most `--settle-s`). A replica's batch is
capped small (`--max-num-seqs` 2) so that the ramp saturates one replica and queues form: on
a 2-core CPU a tiny model's replica with a larger batch keeps up with the whole ramp alone.
The replicas share this process and its cores (a new one adds batch slots, little CPU): the
run times the autoscaling, it does not measure what more hardware would serve. New replicas
are built in a worker thread so that the router keeps serving meanwhile, as it does while a
replica starts in its own process.

Every `--sample-s` (0.25 s) a sample records: the scheduled request rate; serving, starting
and draining replicas; requests in flight (submitted, not finished), awaiting their first
token (queued at the router or a replica, or in prefill) and reported waiting by the
replicas; TTFT p50 of the requests whose first token came in the window; output tokens per
second in the window.

Scale events: for each replica added, the decision time (the autoscaler calls the factory),
`decision_to_serving_s` (the factory returns a warmed-up replica and the router lists it as
serving) and `decision_to_first_token_s` (the first delta with tokens of a request placed on
the new replica reaches its client: the router's placement of the request, read when its
first token arrives); for each replica drained, `drain_s` from the decision (its state turns
to draining: it takes no new request) to its removal (its requests finished there, or moved
after `--drain-grace-s`).

Output: `<out>/elastic.json` (config, time series, scale events, totals) and
`<out>/elastic.png` (request rate and replicas; queue; TTFT; throughput; scale events
marked). Unless `--model` is given, a tiny random Llama (hidden 64, 2 layers, 4 heads, 2 KV
heads, the tiny random model's tokenizer) is built into a temp dir. Examples:

    python benchmarks/elastic.py --out elastic-report          # about 1.5 minutes on 2 CPU cores
    python benchmarks/elastic.py --quick --out elastic-quick    # seconds: tiny sizes (the smoke test)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path


def span(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    low, high = int(low), int(high or low)
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX with 1 <= MIN <= MAX (got {text!r})")
    return low, high


def steps(text: str) -> list[tuple[float, float]]:
    """`RATE:SECONDS,...` → [(rate, seconds)]."""
    out = []
    for part in text.split(","):
        rate, _, seconds = part.strip().partition(":")
        try:
            out.append((float(rate), float(seconds)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected RATE:SECONDS,... (got {text!r})") from None
        if out[-1][0] < 0 or out[-1][1] <= 0:
            raise argparse.ArgumentTypeError(f"rates must be >= 0 and durations > 0 (got {part!r})")
    return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def rate_at(schedule: list[tuple[float, float]], t: float) -> float:
    start = 0.0
    for rate, seconds in schedule:
        if t < start + seconds:
            return rate
        start += seconds
    return 0.0


def arrivals(schedule: list[tuple[float, float]], output_len: tuple[int, int], seed: int) -> list[tuple[float, int]]:
    """Poisson arrivals at a piecewise constant rate: [(time, output tokens)], seeded."""
    rng = random.Random(f"elastic/{seed}")
    out, start = [], 0.0
    for rate, seconds in schedule:
        t = start
        while rate > 0:
            t += rng.expovariate(rate)
            if t >= start + seconds:
                break
            out.append((t, rng.randint(*output_len)))
        start += seconds
    return out


def prompt_for(index: int) -> str:
    """~20 tokens, distinct from the second token on (no shared full block between requests)."""
    return f"Request {index}: a short note on the mill by the river, the weather and the road, part {index % 13}."


def build_tiny_llama(directory: Path, max_position_embeddings: int = 512, tokenizer_dir: Path | None = None) -> Path:
    """A random tiny Llama (see `quire.cluster.tools.default_model.build_tiny_llama`)."""
    from quire.cluster.tools.default_model import build_tiny_llama as build

    return build(directory, max_position_embeddings, tokenizer_dir)


async def run(args, model_path: str) -> dict:
    from quire.cluster.core.block_hash import new_hash_seed
    from quire.cluster.core.config import EngineConfig
    from quire.cluster.core.engine import Engine
    from quire.cluster.serving.autoscaler import AutoscaleConfig
    from quire.cluster.serving.replica import InprocReplica, ReplicaHost
    from quire.cluster.serving.router import Router, served_model
    from quire.protos.step import SamplingParams

    loop = asyncio.get_running_loop()
    seed = new_hash_seed()
    engine_kwargs = dict(model=model_path, dtype="float32", num_kv_blocks=args.num_kv_blocks,
                         max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs, hash_seed=seed,
                         kv_events=True)
    events: list[dict] = []   # the scale events, times on the loop's clock until the report
    by_replica: dict[str, dict] = {}

    class Recorder(Router):
        """The router, with its scale decisions timed where they are taken."""

        async def add_replica(self) -> str:
            event = {"direction": "up", "replica": None, "decision": loop.time(), "serving": None,
                     "first_token": None}
            events.append(event)
            name = await super().add_replica()
            event["replica"] = name
            return name

        async def drain_replica(self, name: str, grace_seconds: float | None = None) -> None:
            event = {"direction": "down", "replica": name, "decision": loop.time(), "removed": None,
                     "live_requests_at_decision": self.pool.records[name].load.live_requests}
            events.append(event)
            await super().drain_replica(name, grace_seconds)
            event["removed"] = loop.time()

    def build_host():
        return ReplicaHost.build(Engine(EngineConfig.from_kwargs(**engine_kwargs)))

    async def factory(replica_id: str):
        # Built in a worker thread: the router's loop keeps serving meanwhile, as it does
        # while a Ray replica starts in its own process. The warm-up step runs on the loop.
        host = await asyncio.to_thread(build_host)
        await host.warm_up()
        # The pool lists the replica as serving as soon as this returns (no await between).
        for event in events:
            if event["direction"] == "up" and event["serving"] is None:
                event["serving"], event["replica"] = loop.time(), replica_id
                by_replica[replica_id] = event
        return InprocReplica(replica_id, host)

    initial = []
    for i in range(args.min_replicas):
        host = build_host()
        await host.warm_up()
        initial.append(InprocReplica(f"replica-{i}", host))
    config = AutoscaleConfig(min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                             target_ongoing_requests=args.target_ongoing, scale_up_waiting=args.scale_up_waiting,
                             scale_up_seconds=args.scale_up_s, scale_down_seconds=args.scale_down_s,
                             tick_seconds=args.tick_s)
    router = Recorder(initial, served_model(engine_kwargs, args.num_kv_blocks), seed, policy=args.policy,
                      replica_factory=factory, poll_seconds=args.poll_s, autoscale=config,
                      drain_grace_seconds=args.drain_grace_s)
    plan = arrivals(args.steps, args.output_len, args.seed)
    state = {"in_flight": 0, "awaiting_first": 0, "tokens": 0, "completed": 0, "failed": 0}
    first_tokens: list[tuple[float, float]] = []  # (time of the first token, TTFT)
    failures: list[str] = []
    samples: list[dict] = []

    async def one(index: int, at: float, output_len: int, origin: float) -> None:
        await asyncio.sleep(max(0.0, origin + at - loop.time()))
        request_id = f"q{index}"
        params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
        submitted, first = loop.time(), None
        state["in_flight"] += 1
        state["awaiting_first"] += 1
        try:
            async for delta in router.generate(prompt_for(index), params, request_id):
                new = sum(len(c.token_ids) for c in delta.outputs)
                state["tokens"] += new
                if new and first is None:
                    first = loop.time()
                    state["awaiting_first"] -= 1
                    first_tokens.append((first, first - submitted))
                    placement = router._placements.get(request_id)
                    event = by_replica.get(placement.replica_id) if placement is not None else None
                    if event is not None and event["first_token"] is None:
                        event["first_token"] = first
            state["completed"] += 1
        except Exception as error:  # noqa: BLE001 - counted: the benchmark wants none
            state["failed"] += 1
            failures.append(f"{request_id}: {type(error).__name__}: {error}")
        finally:
            state["in_flight"] -= 1
            if first is None:
                state["awaiting_first"] -= 1

    async def sample(origin: float) -> None:
        last_t, last_tokens, seen = origin, 0, 0
        while True:
            await asyncio.sleep(args.sample_s)
            now = loop.time()
            replicas = router.list_replicas()
            fresh = [ttft for at, ttft in first_tokens[seen:]]
            seen = len(first_tokens)
            count = {s: sum(r.state == s for r in replicas) for s in ("serving", "starting", "draining")}
            samples.append({
                "t": now - origin, "rate": rate_at(args.steps, now - origin), **count,
                "in_flight": state["in_flight"], "awaiting_first_token": state["awaiting_first"],
                "waiting_on_replicas": router.stats().num_waiting,
                "ttft_p50_s": statistics.median(fresh) if fresh else None, "first_tokens": len(fresh),
                "output_tokens_per_s": (state["tokens"] - last_tokens) / (now - last_t),
            })
            last_t, last_tokens = now, state["tokens"]

    router.start()
    origin = loop.time()
    sampler = asyncio.ensure_future(sample(origin))
    try:
        await asyncio.gather(*(one(i, at, n, origin) for i, (at, n) in enumerate(plan)))
        load_end = loop.time()
        while loop.time() < load_end + args.settle_s and (
                len(router.replica_ids()) > args.min_replicas or len(router.list_replicas()) > args.min_replicas):
            await asyncio.sleep(args.sample_s)
        await asyncio.sleep(args.sample_s)  # one more sample of the final state
        end = loop.time()
    finally:
        sampler.cancel()
        router.shutdown()
        await asyncio.sleep(0.1)  # the replicas' shutdown, spawned by the router

    def rel(value):
        return None if value is None else value - origin

    scale_events = []
    for event in sorted(events, key=lambda e: e["decision"]):
        row = {"t": rel(event["decision"]), "direction": event["direction"], "replica": event["replica"]}
        if event["direction"] == "up":
            row["decision_to_serving_s"] = None if event["serving"] is None else event["serving"] - event["decision"]
            row["decision_to_first_token_s"] = (None if event["first_token"] is None
                                                else event["first_token"] - event["decision"])
        else:
            row["drain_s"] = None if event["removed"] is None else event["removed"] - event["decision"]
            row["live_requests_at_decision"] = event["live_requests_at_decision"]
        scale_events.append(row)
    ttfts = [ttft for _, ttft in first_tokens]
    wall = end - origin
    return {
        "series": samples, "scale_events": scale_events,
        "totals": {
            "requests": len(plan), "completed": state["completed"], "failed": state["failed"],
            "failures": failures[:10], "output_tokens": state["tokens"], "seconds": wall,
            "load_seconds": load_end - origin, "output_tokens_per_s": state["tokens"] / wall if wall else None,
            "ttft_s_p50": percentile(ttfts, 0.5), "ttft_s_p90": percentile(ttfts, 0.9),
            "ttft_s_max": max(ttfts) if ttfts else None,
            "scale_ups": sum(e["direction"] == "up" for e in scale_events),
            "scale_downs": sum(e["direction"] == "down" for e in scale_events),
            "peak_serving_replicas": max((s["serving"] for s in samples), default=None),
            "final_serving_replicas": samples[-1]["serving"] if samples else None,
            "migrations": router.counters.migrations,
        },
    }


def format_summary(report: dict) -> str:
    totals = report["totals"]
    fmt = lambda v, spec=".2f": "-" if v is None else format(v, spec)  # noqa: E731
    lines = [f"{totals['requests']} requests over {totals['load_seconds']:.1f}s of load "
             f"({','.join(f'{r:g}:{s:g}' for r, s in report['config']['steps'])} req/s:s); "
             f"completed {totals['completed']}, failed {totals['failed']}; "
             f"TTFT p50 {fmt(totals['ttft_s_p50'], '.3f')}s p90 {fmt(totals['ttft_s_p90'], '.3f')}s; "
             f"{fmt(totals['output_tokens_per_s'], '.1f')} output tok/s over {totals['seconds']:.1f}s; "
             f"replicas peak {totals['peak_serving_replicas']}, final {totals['final_serving_replicas']}"]
    for event in report["scale_events"]:
        if event["direction"] == "up":
            lines.append(f"  t={event['t']:6.2f}s up   {event['replica']}: decision -> serving "
                         f"{fmt(event['decision_to_serving_s'])}s, -> first token served "
                         f"{fmt(event['decision_to_first_token_s'])}s")
        else:
            lines.append(f"  t={event['t']:6.2f}s down {event['replica']}: drained in {fmt(event['drain_s'])}s "
                         f"({event['live_requests_at_decision']} requests live at the decision)")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Four panels over time: rate and replicas; queue; TTFT p50; throughput; scale events marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = report["series"]
    t = [s["t"] for s in series]
    fig, axes = plt.subplots(4, 1, figsize=(11, 11), sharex=True)
    ax = axes[0]
    ax.step(t, [s["rate"] for s in series], where="post", color="C0", label="request rate (req/s)")
    ax.set_ylabel("requests / s")
    twin = ax.twinx()
    twin.step(t, [s["serving"] for s in series], where="post", color="C1", lw=2, label="serving replicas")
    twin.step(t, [s["serving"] + s["starting"] + s["draining"] for s in series], where="post", color="C1", ls=":",
              label="+ starting / draining")
    twin.set_ylabel("replicas")
    twin.set_ylim(0, report["config"]["max_replicas"] + 0.5)
    twin.yaxis.get_major_locator().set_params(integer=True)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper left")
    ax.set_title("Elastic replicas under a load ramp (dashed: scale up decisions, dotted: scale down)")
    ax = axes[1]
    ax.plot(t, [s["in_flight"] for s in series], label="in flight")
    ax.plot(t, [s["awaiting_first_token"] for s in series], label="awaiting first token")
    ax.plot(t, [s["waiting_on_replicas"] for s in series], label="waiting on replicas (reported)")
    ax.set_ylabel("requests")
    ax.legend(fontsize=8, loc="upper left")
    ax = axes[2]
    points = [(s["t"], s["ttft_p50_s"]) for s in series if s["ttft_p50_s"] is not None]
    ax.plot([p[0] for p in points], [p[1] * 1e3 for p in points], ".-", ms=3, color="C3")
    ax.set_ylabel("TTFT p50 in window (ms)")
    ax.set_yscale("log")
    ax = axes[3]
    ax.plot(t, [s["output_tokens_per_s"] for s in series], color="C2")
    ax.set_ylabel("output tokens / s")
    ax.set_xlabel("time (s)")
    for event in report["scale_events"]:
        style = "--" if event["direction"] == "up" else ":"
        for ax in axes:
            ax.axvline(event["t"], color="grey", ls=style, lw=1)
        end = event["t"] + (event.get("decision_to_serving_s") or event.get("drain_s") or 0.0)
        axes[0].axvspan(event["t"], end, color="grey", alpha=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="directory for elastic.json and elastic.png (created)")
    p.add_argument("--model", help="checkpoint (default: build a tiny random Llama)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: seconds (the smoke test)")
    p.add_argument("--steps", type=steps, default=steps("2:12,8:12,12:12,8:12,2:12,0.5:12"),
                   help="the load: RATE:SECONDS,... (requests per second, Poisson)")
    p.add_argument("--output-len", type=span, default=(32, 64), help="output tokens per request MIN:MAX")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policy", default="cache_aware")
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=3)
    p.add_argument("--target-ongoing", type=float, default=1.0, help="autoscaler: requests in flight per replica")
    p.add_argument("--scale-up-waiting", type=float, default=1.0,
                   help="autoscaler: waiting requests per replica that also ask for one more")
    p.add_argument("--scale-up-s", type=float, default=2.0, help="autoscaler: the scale-up window")
    p.add_argument("--scale-down-s", type=float, default=5.0, help="autoscaler: the scale-down window")
    p.add_argument("--tick-s", type=float, default=0.25, help="autoscaler: its tick")
    p.add_argument("--drain-grace-s", type=float, default=30.0,
                   help="a draining replica's requests finish there for up to this long, then move")
    p.add_argument("--settle-s", type=float, default=30.0,
                   help="after the load: at most this long for the deployment to shrink back to --min-replicas")
    p.add_argument("--sample-s", type=float, default=0.25)
    p.add_argument("--poll-s", type=float, default=0.02, help="the router's poll interval per replica")
    p.add_argument("--num-kv-blocks", type=int, default=512, help="per replica")
    p.add_argument("--max-model-len", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=2,
                   help="per replica: its batch cap (small, so that the ramp's peak saturates one replica)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    if args.quick:
        # A burst, not a ramp: its backlog (~100 requests at a batch cap of 2) must outlast the
        # scale-up window however fast the machine is; at 40 req/s for 2 s a replica on a fast
        # hour of a 2-core VM kept up alone and nothing scaled.
        args.steps = steps("2:0.5,200:0.5,1:1.5")
        args.output_len = (16, 24)
        args.max_replicas, args.target_ongoing = 2, 1.0
        args.scale_up_s, args.scale_down_s, args.tick_s = 0.2, 0.5, 0.05
        args.drain_grace_s, args.settle_s, args.sample_s = 5.0, 10.0, 0.1
        args.num_kv_blocks, args.max_model_len = 256, 128
    if not 1 <= args.min_replicas <= args.max_replicas:
        p.error("expected 1 <= --min-replicas <= --max-replicas")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "out"}
    config["steps"] = [list(s) for s in args.steps]
    config["argv"] = sys.argv[1:] if argv is None else list(argv)
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="quire-elastic-") as tmp:
        model_path = args.model or str(build_tiny_llama(Path(tmp)))
        result = asyncio.run(run(args, model_path))
    report = {
        "config": config,
        "model": args.model or "tiny random Llama built in a temp dir (hidden 64, 2 layers, 4 heads, 2 KV heads)",
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_at_end": os.getloadavg()},
        "how_measured": {
            "replicas": "in-process replicas sharing this process (and its CPU cores): a new replica adds "
                        "batch slots, not CPU; the figures time the autoscaling, not a capacity gain",
            "decision": "up: the autoscaler calls the replica factory; down: the replica's state turns to "
                        "draining (it takes no new request)",
            "decision_to_serving_s": "until the factory returns the new replica, built and warmed up (one "
                                     "real step); the router lists it as serving at that moment",
            "decision_to_first_token_s": "until the first delta with tokens of a request placed on the new "
                                         "replica (the router's placement, read when that first token "
                                         "reaches the client)",
            "drain_s": "until the drained replica is shut down and removed from the router's list (its "
                       "requests finished there, or moved after the drain grace)",
            "awaiting_first_token": "requests submitted with no token yet: queued at the router or a "
                                    "replica, or in prefill",
            "waiting_on_replicas": "the serving replicas' own waiting queues, as last reported",
            "ttft_p50_s": "median TTFT (submit to the first delta with tokens) of the requests whose first "
                          "token came in the sample's window",
            "output_tokens_per_s": "output tokens received by the clients in the window, over its length",
        },
        **result,
    }
    report["total_seconds"] = time.perf_counter() - started
    print(format_summary(report))
    print(f"total {report['total_seconds']:.1f}s (model build and replica start included)")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "elastic.json").write_text(json.dumps(report, indent=1))
        plot(report, out / "elastic.png")
    return report


if __name__ == "__main__":
    main()
