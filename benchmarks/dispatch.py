"""What crossing the wire costs: the same offline workload through the in-process
executor and through Ray + gRPC workers at tp=1 (with asynchronous scheduling and CPU
core binding, its defaults, without asynchronous scheduling, and without binding) and
tp=2, in one run, plus the controller's own cost per step at 256 running requests.

Each engine first serves the whole workload once, untimed (warm-up). Reports per transport
(medians of `--repeats` runs, each between two in-process runs):
wall seconds, output tokens/s, the median ratio of throughput against the mean of the
two in-process runs around each run, controller time per step (inside `Engine.step`,
outside waiting for the executor: scheduling, plan building, detokenising, stop checks),
the worker's forward time per step, the wait beyond it per step (executor wait minus the
worker's forward: the transport, less what asynchronous scheduling overlaps), bytes per
StepPlan, the share of CPU time stolen by the hypervisor during the run (`cpu_steal_share`,
Linux), and the RPC round trip (a plan with no work sent to every rank and rank 0's
answer back, median of 200). Separately, with no model, the controller's side of a
decode step for 256 running requests: scheduling and serialising the plan, then parsing
the answer and appending its tokens (median and quickest of `--repeats` runs); and the
plan's bytes per request.

Also with no model (`controller_cost.py`: a stub executor in place of the workers, answering every plan at
once with a token from a fixed set of ordinary word tokens, and logprobs): the
controller's cost per generated token once each request already has `--histories`
output tokens (100 and 4,000 by default, 32 requests, each asking for 5 logprobs), in
the `Engine` and through the `AsyncEngine` to consumers accumulating their outputs as a
frontend would, and the same at 256 running decodes (`controller_token_cost`). Flat in
the history means nothing per token is proportional to what came before it.

    python benchmarks/dispatch.py --num-requests 64 --out dispatch.json
    python benchmarks/dispatch.py --controller-only --out controller.json   # no model, no Ray: a minute or two
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import torch
from controller_cost import _cluster, controller_report, token_cost_report
from throughput_workloads import cpu_ticks, steal_share


parse_range = _cluster("tools", "bench_serve").parse_range


def workload(args, vocab_size):
    rng = random.Random(args.seed)
    prompts, params = [], []
    from quire.cluster import SamplingParams

    for _ in range(args.num_requests):
        prompts.append([rng.randrange(3, vocab_size) for _ in range(rng.randint(*args.input_len))])
        params.append(SamplingParams(temperature=0, max_tokens=rng.randint(*args.output_len), ignore_eos=True))
    return prompts, params


def measure(name, llm, prompts, params):
    """One timed run of the workload on a loaded engine: its figures, and the token ids."""
    llm.engine.stats.__init__()
    bytes_before = llm.engine.executor.bytes_sent
    ticks_before = cpu_ticks()
    began = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - began
    steal = steal_share(ticks_before, cpu_ticks())  # CPU time the hypervisor gave to other guests
    stats = llm.engine.stats
    world = llm.engine.executor.world_size
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "transport": name, "wall_seconds": wall, "output_tokens_per_s": tokens / wall, "steps": stats.num_steps,
        "controller_us_per_step": 1e6 * (stats.step_seconds - stats.execute_seconds) / stats.num_steps,
        "worker_forward_us_per_step": 1e6 * stats.forward_seconds / stats.num_steps,
        "wait_beyond_forward_us_per_step": 1e6 * (stats.execute_seconds - stats.forward_seconds) / stats.num_steps,
        "plan_bytes_per_step": (llm.engine.executor.bytes_sent - bytes_before) / world / stats.num_steps,
        "cpu_steal_share": steal,
    }, [o.outputs[0].token_ids for o in outputs]


def sandwiched(inproc, remote, name: str, prompts, params, repeats: int) -> dict:
    """`repeats` timed runs of `remote`, each between two in-process runs, its throughput
    ratio taken against their mean (the machine's speed drifts within a minute; a steady
    drift cancels). Returns both engines' rows and tokens, and the ratios."""
    before, inproc_tokens = measure("inproc", inproc, prompts, params)
    inproc_rows, rows, ratios = [before], [], []
    for _ in range(repeats):
        row, tokens = measure(name, remote, prompts, params)
        after, _ = measure("inproc", inproc, prompts, params)
        inproc_rows.append(after)
        rows.append(row)
        ratios.append((before["wall_seconds"] + after["wall_seconds"]) / 2 / row["wall_seconds"])
        before = after
        print(json.dumps(row), flush=True)
    return {"inproc_rows": inproc_rows, "rows": rows, "ratios": ratios, "inproc_tokens": inproc_tokens,
            "tokens": tokens}


def rpc_round_trip_us(llm, calls: int = 200) -> float:
    """Median time for a plan with no work to reach every rank and rank 0's answer to come
    back: the step stream's round trip itself (transport, the worker's threads, both sides'
    (de)serialisation), in microseconds. In process it is a function call."""
    from quire.protos.step import StepPlan

    times = []
    for _ in range(calls):
        began = time.perf_counter()
        llm.engine.executor.execute(StepPlan(step_id=0))
        times.append(time.perf_counter() - began)
    return 1e6 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--input-len", type=parse_range, default=(32, 128))
    parser.add_argument("--output-len", type=parse_range, default=(32, 128))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per transport (medians reported)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of every rank's forward pass, in process and in the workers "
                             "(default: torch's in process; the cores split between ranks in workers)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--controller-only", action="store_true",
                        help="only the figures that need no model and no Ray: the controller's cost per step at "
                             "256 running requests, and per generated token (`controller_token_cost`)")
    parser.add_argument("--token-requests", type=int, default=32, help="running requests of the per-token figures")
    parser.add_argument("--histories", type=lambda text: [int(h) for h in text.split(",")], default=[100, 4000],
                        help="output tokens each request already has when a per-token window opens (comma-separated)")
    parser.add_argument("--measure-tokens", type=int, default=200, help="steps (tokens per request) of each window")
    parser.add_argument("--wide-requests", type=int, default=256, help="running requests of the wide per-token figure")
    parser.add_argument("--wide-history", type=int, default=100)
    args = parser.parse_args()
    if args.controller_only:
        ticks_before = cpu_ticks()
        load_before = os.getloadavg()
        began = time.perf_counter()
        controller = controller_report(256, 200, args.repeats)
        print(json.dumps({"controller_256": controller}), flush=True)
        report = {"config": vars(args), "controller_256": controller, **token_cost_report(args)}
        ticks_after = cpu_ticks()
        report["machine"] = {
            "cpu_cores": len(os.sched_getaffinity(0)), "seconds": time.perf_counter() - began,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "cpu_steal_share": steal_share(ticks_before, ticks_after),
            "engine_module": _cluster("core", "engine").__file__}
        text = json.dumps(report, indent=2)
        if args.out:
            with open(args.out, "w") as handle:
                handle.write(text)
        print(text)
        return
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the workers' (Ray and local launchers honour it)
    default_model_dir = _cluster("tools", "default_model").default_model_dir
    from transformers import AutoConfig

    model = args.model or str(default_model_dir())
    prompts, params = workload(args, AutoConfig.from_pretrained(model).vocab_size)
    # Before Ray starts: its daemons share this machine's cores.
    controller = controller_report(256, 200, args.repeats)
    print(json.dumps({"controller_256": controller}), flush=True)
    token_cost = token_cost_report(args)
    print(json.dumps({"history_growth": token_cost["history_growth"]}), flush=True)
    import ray

    transports = [("inproc", dict(executor="inproc")),
                  ("ray-grpc-tp1", dict(executor="ray", tensor_parallel_size=1)),
                  ("ray-grpc-tp1-sync", dict(executor="ray", tensor_parallel_size=1, async_scheduling=False)),
                  ("ray-grpc-tp1-unbound", dict(executor="ray", tensor_parallel_size=1, bind_cpu_cores=False)),
                  ("ray-grpc-tp2", dict(executor="ray", tensor_parallel_size=2))]
    ray.init(include_dashboard=False, log_to_driver=False)
    from quire.cluster import LLM

    round_trips = {}

    def load(name, kwargs):
        llm = LLM(model=model, dtype="float32", num_kv_blocks=4096, **kwargs)
        # Warm-up: one untimed run of the whole workload. A fresh engine's first run touches
        # its KV pool and grows its allocators' arenas for the first time; timed, it came out
        # 10% slower than the runs after it (the first of five paired ratios was the lowest
        # in 31 of 38 runs), a start-up cost, not the transport's.
        llm.generate(prompts, params, use_tqdm=False)
        round_trips[name] = rpc_round_trip_us(llm)
        return llm

    runs, tokens = {name: [] for name, _ in transports}, {}
    ratios = {name: [] for name, _ in transports[1:]}
    inproc = load(*transports[0])
    try:
        # Only the remote engine and the in-process one are loaded at a time (idle workers
        # would add their own noise).
        for name, kwargs in transports[1:]:
            remote = load(name, kwargs)
            try:
                compared = sandwiched(inproc, remote, name, prompts, params, args.repeats)
            finally:
                remote.shutdown()
            runs["inproc"] += compared["inproc_rows"]
            runs[name] += compared["rows"]
            ratios[name] = compared["ratios"]
            tokens["inproc"], tokens[name] = compared["inproc_tokens"], compared["tokens"]
    finally:
        inproc.shutdown()
    results = []
    for name, rows in runs.items():
        median = {key: statistics.median(row[key] for row in rows) for key in rows[0]
                  if key != "transport" and all(row[key] is not None for row in rows)}
        results.append({"transport": name, **median, "rpc_round_trip_us": round_trips[name],
                        "wall_seconds_all": [row["wall_seconds"] for row in rows]})
        if name in ratios:  # the median ratio against the in-process runs around each run, and each one
            results[-1].update(throughput_vs_inproc=statistics.median(ratios[name]), paired_ratios=ratios[name])
    report = {"config": {k: v for k, v in vars(args).items()}, "results": results,
              "identical_tokens": {n: t == tokens["inproc"] for n, t in tokens.items()},
              "controller_256": controller, **token_cost,
              "machine": {"torch_threads": torch.get_num_threads(), "cpu_cores": len(os.sched_getaffinity(0))}}
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
    print(text)
    ray.shutdown()


if __name__ == "__main__":
    main()
