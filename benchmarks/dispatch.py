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

    python benchmarks/dispatch.py --num-requests 64 --out dispatch.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import torch

from quire.cluster.tools.bench_serve import parse_range


def workload(args, vocab_size):
    rng = random.Random(args.seed)
    prompts, params = [], []
    from quire.cluster import SamplingParams

    for _ in range(args.num_requests):
        prompts.append([rng.randrange(3, vocab_size) for _ in range(rng.randint(*args.input_len))])
        params.append(SamplingParams(temperature=0, max_tokens=rng.randint(*args.output_len), ignore_eos=True))
    return prompts, params


def cpu_ticks() -> tuple[int, int] | None:
    """(steal, total) CPU ticks of the machine so far, from /proc/stat; None off Linux."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(field) for field in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def measure(name, llm, prompts, params):
    """One timed run of the workload on a loaded engine: its figures, and the token ids."""
    llm.engine.stats.__init__()
    bytes_before = llm.engine.executor.bytes_sent
    ticks_before = cpu_ticks()
    began = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - began
    ticks_after = cpu_ticks()
    steal = None  # the share of CPU time the hypervisor gave to other guests during the run
    if ticks_before and ticks_after and ticks_after[1] > ticks_before[1]:
        steal = (ticks_after[0] - ticks_before[0]) / (ticks_after[1] - ticks_before[1])
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


def controller_microbench(num_running: int, steps: int) -> dict:
    """The controller's side of a decode step for `num_running` requests, with no model:
    schedule and serialise the plan (the goal's "scheduling + plan building"), then parse
    rank 0's answer and append its tokens. (Building that answer is the worker's work and
    is not timed.) Medians over the steps, in microseconds."""
    from quire.cluster.core.block_pool import BlockPool
    from quire.cluster.core.config import SchedulerConfig
    from quire.cluster.core.kv_cache_manager import KVCacheManager
    from quire.cluster.core.request import Request
    from quire.cluster.core.scheduler import Scheduler
    from quire.protos import worker_pb2 as pb
    from quire.protos.step import SamplingParams, StepResult

    scheduler = Scheduler(SchedulerConfig(max_num_seqs=num_running, max_num_batched_tokens=1 << 20),
                          KVCacheManager(BlockPool(num_running * 40), 16))
    for i in range(num_running):
        # Staggered lengths spread block-boundary crossings over the steps, as in real traffic.
        scheduler.add_request(Request(f"request-{i}", [5] * (100 + i % 16),
                                      SamplingParams(temperature=0, max_tokens=10**6)))
    planning, answering, sizes = [], [], []
    for step in range(steps + 1):
        began = time.perf_counter()
        plan = scheduler.schedule()
        wire = plan.to_pb().SerializeToString()
        planned = time.perf_counter()
        handles = [handle for handle, _ in plan.scheduled()]
        answer = StepResult(plan.step_id, sampled_handles=handles, sampled_token_ids=[7] * len(handles))
        answer_wire = answer.to_pb().SerializeToString()
        answered = time.perf_counter()
        scheduler.update_from_output(plan, StepResult.from_pb(pb.StepResult.FromString(answer_wire)))
        if step:  # step 0 is the prefill
            planning.append(planned - began)
            answering.append(time.perf_counter() - answered)
            sizes.append(len(wire))
    return {"schedule_and_plan_us": 1e6 * statistics.median(planning),
            "parse_and_append_us": 1e6 * statistics.median(answering),
            "plan_bytes": statistics.median(sizes)}


def controller_report(num_running: int, steps: int, repeats: int) -> dict:
    """`controller_microbench` repeated (the machine's speed drifts between runs): the median
    run and the quickest, whose figures are the closest to the code's own cost."""
    runs = [controller_microbench(num_running, steps) for _ in range(repeats)]
    totals = [run["schedule_and_plan_us"] + run["parse_and_append_us"] for run in runs]
    plan_bytes = runs[0]["plan_bytes"]
    return {"running_requests": num_running, "repeats": repeats,
            "schedule_and_plan_us_median": statistics.median(run["schedule_and_plan_us"] for run in runs),
            "schedule_and_plan_us_best": min(run["schedule_and_plan_us"] for run in runs),
            "with_parse_and_append_us_median": statistics.median(totals), "with_parse_and_append_us_best": min(totals),
            "runs": runs, "plan_bytes": plan_bytes, "plan_bytes_per_request": plan_bytes / num_running}


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
    args = parser.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the workers' (Ray and local launchers honour it)
    from quire.cluster.tools.default_model import default_model_dir
    from transformers import AutoConfig

    model = args.model or str(default_model_dir())
    prompts, params = workload(args, AutoConfig.from_pretrained(model).vocab_size)
    # Before Ray starts: its daemons share this machine's cores.
    controller = controller_report(256, 200, args.repeats)
    print(json.dumps({"controller_256": controller}), flush=True)
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
              "controller_256": controller,
              "machine": {"torch_threads": torch.get_num_threads(), "cpu_cores": len(os.sched_getaffinity(0))}}
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
    print(text)
    ray.shutdown()


if __name__ == "__main__":
    main()
