"""What crossing the wire costs: the same offline workload through the in-process
executor and through Ray + gRPC workers at tp=1 and tp=2, in one run, plus the
controller's own cost per step at 256 running requests.

Reports per transport: wall seconds, output tokens/s and the ratio to in-process,
controller time per step (inside `Engine.step`, outside the executor: scheduling, plan
building, detokenising, stop checks), transport time per step (executor wall time minus
the worker's forward), and bytes per StepPlan. Separately, with no model: scheduling
plus serialising one decode plan for 256 running requests, and its bytes per request.

    python benchmarks/dispatch.py --num-requests 64 --out dispatch.json
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch


def workload(args, vocab_size):
    rng = random.Random(args.seed)
    prompts, params = [], []
    from quire.cluster import SamplingParams

    for _ in range(args.num_requests):
        prompts.append([rng.randrange(3, vocab_size) for _ in range(rng.randint(*args.input_len))])
        params.append(SamplingParams(temperature=0, max_tokens=rng.randint(*args.output_len), ignore_eos=True))
    return prompts, params


def run_transport(name, kwargs, model, prompts, params):
    from quire.cluster import LLM

    llm = LLM(model=model, dtype="float32", num_kv_blocks=4096, **kwargs)
    try:
        llm.generate(prompts[:4], params[:4], use_tqdm=False)  # warm-up
        llm.engine.stats.__init__()
        bytes_before = llm.engine.executor.bytes_sent
        began = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - began
        stats = llm.engine.stats
        world = llm.engine.executor.world_size
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        return {
            "transport": name, "wall_seconds": wall, "output_tokens_per_s": tokens / wall, "steps": stats.num_steps,
            "controller_us_per_step": 1e6 * (stats.step_seconds - stats.execute_seconds) / stats.num_steps,
            "transport_us_per_step": 1e6 * (stats.execute_seconds - stats.forward_seconds) / stats.num_steps,
            "plan_bytes_per_step": (llm.engine.executor.bytes_sent - bytes_before) / world / stats.num_steps,
        }, [o.outputs[0].token_ids for o in outputs]
    finally:
        llm.shutdown()


def controller_microbench(num_running: int, steps: int) -> dict:
    """Scheduling + serialising a decode step for `num_running` requests (no model)."""
    from quire.cluster.block_pool import BlockPool
    from quire.cluster.config import SchedulerConfig
    from quire.cluster.kv_cache_manager import KVCacheManager
    from quire.cluster.request import Request
    from quire.cluster.scheduler import Scheduler
    from quire.protos.step import SampledToken, SamplingParams, StepResult

    scheduler = Scheduler(SchedulerConfig(max_num_seqs=num_running, max_num_batched_tokens=1 << 20),
                          KVCacheManager(BlockPool(num_running * 40), 16))
    for i in range(num_running):
        scheduler.add_request(Request(f"request-{i}", [5] * 100, SamplingParams(temperature=0, max_tokens=10**6)))
    timings, sizes = [], []
    for step in range(steps + 1):
        began = time.perf_counter()
        plan = scheduler.schedule()
        wire = plan.to_pb().SerializeToString()
        result = StepResult(plan.step_id, sampled=[SampledToken(h, 7) for h in plan.num_scheduled_tokens])
        scheduler.update_from_output(plan, result)
        if step:  # step 0 is the prefill
            timings.append(time.perf_counter() - began)
            sizes.append(len(wire))
    return {"running_requests": num_running, "us_per_step_median": 1e6 * statistics.median(timings),
            "plan_bytes": statistics.median(sizes), "plan_bytes_per_request": statistics.median(sizes) / num_running}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    span = lambda text: tuple(int(x) for x in text.split(":"))  # noqa: E731
    parser.add_argument("--model", default=None)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--input-len", type=span, default=(32, 128))
    parser.add_argument("--output-len", type=span, default=(32, 128))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from quire.cluster.default_model import default_model_dir
    from transformers import AutoConfig

    model = args.model or str(default_model_dir())
    prompts, params = workload(args, AutoConfig.from_pretrained(model).vocab_size)
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    results, tokens = [], {}
    for name, kwargs in [("inproc", dict(executor="inproc")),
                         ("ray-grpc-tp1", dict(executor="ray", tensor_parallel_size=1)),
                         ("ray-grpc-tp2", dict(executor="ray", tensor_parallel_size=2))]:
        row, tokens[name] = run_transport(name, kwargs, model, prompts, params)
        results.append(row)
        print(json.dumps(row), flush=True)
    base = results[0]["output_tokens_per_s"]
    for row in results:
        row["throughput_vs_inproc"] = row["output_tokens_per_s"] / base
    report = {"config": {k: v for k, v in vars(args).items()}, "results": results,
              "identical_tokens": {n: t == tokens["inproc"] for n, t in tokens.items()},
              "controller_256": controller_microbench(256, 50),
              "machine": {"torch_threads": torch.get_num_threads()}}
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
    print(text)
    ray.shutdown()


if __name__ == "__main__":
    main()
