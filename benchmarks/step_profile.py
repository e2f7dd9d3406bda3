#!/usr/bin/env python
"""Where a quire step's time goes, by category, on the ``long`` throughput workload.

Runs quire in process (``LLM`` on the CPU) on the ``long`` workload of ``throughput.py``
(or its first ``--num-requests``): once untimed to warm up, once plain (timed), then once
with timers wrapped around the pieces of a step: the engine step, the model runner's plan application and
input building, the attention backend's plan / write_kv / attend, every linear layer,
the LM head, the norms, the rotary embedding, the MLP's activation, the embedding and the
sampler. Each range's *exclusive* time (its own, less the ranges nested in it) is summed
into a category; what the model's forward does outside every range (residual adds, the
QKV split, views and copies) is ``copies/other``. Timers are wall-clock ``perf_counter``
pairs (the CPU runs synchronously), about a microsecond each; the totals are compared
with an uninstrumented run of the same work (``uninstrumented_wall_seconds``).

Attention is also split by step kind (``attention_by_step_kind``): decode-only steps, with
the K/V bytes they must read and the bandwidth that achieves, beside the machine's streaming
read bandwidth (``machine_read_gbps``): decode attention is memory-bound, and that is its floor.
``gemm_floor`` replays the run's GEMMs alone (every linear layer at each forward's token
count, the LM head at its rows, the model's own weights): the time no kernel or scheduler
work can remove at this machine's GEMM rate.

``--torch-ops N`` also runs the same work under ``torch.profiler`` and lists the N
operators with the most self CPU time (``key_averages``).

    python benchmarks/step_profile.py --num-requests 64 --threads 2 --out step_profile.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
import tempfile
import time


def _load_sibling(name: str):
    """A module beside this script (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, pathlib.Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


workloads = _load_sibling("throughput_workloads")

# range name -> category
CATEGORIES = {
    "engine.step": "engine (scheduler, detokenizer, transport)",
    "runner.execute": "model runner python",
    "runner.apply_plan": "model runner python",
    "runner.prepare": "model runner python",
    "attention.plan": "attention plan",
    "attention.write_kv": "attention",
    "attention.attend": "attention",
    "model.forward": "copies/other (model glue)",
    "embedding": "embedding",
    "linear": "gemm (linear layers)",
    "lm_head": "gemm (LM head)",
    "norm": "norms",
    "rotary": "rotary",
    "activation": "activation (SiLU*mul)",
    "sampler": "sampler",
}


class RangeTimer:
    """Nested wall-clock ranges: `wrap(name, fn)` times every call of `fn`; a range's
    exclusive time excludes the ranges that ran inside it."""

    def __init__(self):
        self.exclusive: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[list] = []  # [name, start, time of nested ranges]

    def wrap(self, name: str, fn):
        stack, clock = self._stack, time.perf_counter

        def timed(*args, **kwargs):
            frame = [name, clock(), 0.0]
            stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = clock() - frame[1]
                stack.pop()
                if stack:
                    stack[-1][2] += elapsed
                self.exclusive[name] = self.exclusive.get(name, 0.0) + elapsed - frame[2]
                self.calls[name] = self.calls.get(name, 0) + 1
        return timed


class _CallableProxy:
    """Stands in for an object whose `__call__` is wrapped (special methods are looked up on the type)."""

    def __init__(self, target, call):
        self._target, self._call = target, call

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._target, name)


class AttentionSplit:
    """Times `attend` apart for decode-only steps (one query row per request) and steps with
    prefill rows, and counts the K/V bytes a decode-only call must read (every context
    position's K and V row of every KV head, once), so decode attention's achieved bandwidth
    can be set beside the machine's (`cpu_attention_bench.read_bandwidth_gbps`)."""

    def __init__(self):
        self.seconds = {"decode_only": 0.0, "with_prefill": 0.0}
        self.calls = {"decode_only": 0, "with_prefill": 0}
        self.decode_kv_bytes = 0

    def wrap(self, attend):
        def timed(query, k_cache, v_cache, plan, *args, **kwargs):
            kind = "decode_only" if query.shape[0] == len(plan.seq_lens) else "with_prefill"
            began = time.perf_counter()
            try:
                return attend(query, k_cache, v_cache, plan, *args, **kwargs)
            finally:
                self.seconds[kind] += time.perf_counter() - began
                self.calls[kind] += 1
                if kind == "decode_only":
                    row_bytes = k_cache.shape[2] * k_cache.shape[3] * k_cache.element_size()
                    self.decode_kv_bytes += 2 * row_bytes * sum(plan.seq_lens)
        return timed

    def report(self, steps: int) -> dict:
        out = {kind: {"ms_per_step": round(1000 * self.seconds[kind] / steps, 3), "calls": self.calls[kind],
                      "seconds": round(self.seconds[kind], 3)} for kind in self.seconds}
        if self.seconds["decode_only"]:
            out["decode_only"]["kv_bytes_read"] = self.decode_kv_bytes
            out["decode_only"]["achieved_gbps"] = round(self.decode_kv_bytes / self.seconds["decode_only"] / 1e9, 2)
        return out


class StepShapes:
    """Records each forward's token count and each LM head call's row count, so the run's
    GEMMs can be replayed alone (`gemm_floor`)."""

    def __init__(self):
        self.tokens: list[int] = []
        self.logit_rows: list[int] = []

    def wrap_forward(self, forward):
        def recorded(input_ids, *args, **kwargs):
            self.tokens.append(int(input_ids.shape[0]))
            return forward(input_ids, *args, **kwargs)
        return recorded

    def wrap_logits(self, compute_logits):
        def recorded(hidden, *args, **kwargs):
            self.logit_rows.append(int(hidden.shape[0]))
            return compute_logits(hidden, *args, **kwargs)
        return recorded


def gemm_floor(model, shapes: StepShapes) -> dict:
    """The run's GEMMs alone: every projection (linear layers and the LM head) of every forward
    at its recorded token count (the head at its recorded rows), through the model's own GEMM
    path (`ProjectionWeight.project`: packed or `F.linear`), with nothing else between them.
    What no attention kernel or scheduler can beat at this machine's GEMM rate: the step's floor."""
    import torch

    from quire.worker.linear import ProjectionWeight

    head = model.lm_head
    linears = [m for m in model.modules() if isinstance(m, ProjectionWeight) and m is not head]
    widest = max(m.weight_shape[1] for m in (*linears, head))
    inputs = torch.randn(max(shapes.tokens + shapes.logit_rows), widest)
    flops = 0
    began = time.perf_counter()
    with torch.inference_mode():
        for tokens in shapes.tokens:
            for m in linears:
                out_features, in_features = m.weight_shape
                m.project(inputs[:tokens, :in_features])
                flops += 2 * tokens * out_features * in_features
        for rows in shapes.logit_rows:
            out_features, in_features = head.weight_shape
            head.project(inputs[:rows, :in_features])
            flops += 2 * rows * out_features * in_features
    seconds = time.perf_counter() - began
    return {"seconds": round(seconds, 3), "tflop": round(flops / 1e12, 3), "gflops": round(flops / seconds / 1e9, 1),
            "forwards": len(shapes.tokens)}


def instrument(llm, timer: RangeTimer, split: AttentionSplit | None = None, shapes: StepShapes | None = None):
    """Wrap the step's pieces of an in-process `llm` (and `split` inside `attend`); returns a
    function that undoes it."""
    from quire.worker.linear import ColumnParallelLinear, RowParallelLinear
    from quire.worker.models import llama

    engine = llm.engine
    runner = engine.executor.worker.runner
    model = runner.model
    undo = []

    def patch(obj, attr, name):
        had = attr in vars(obj)
        old = getattr(obj, attr)
        setattr(obj, attr, timer.wrap(name, old))
        undo.append((lambda: setattr(obj, attr, old)) if had else (lambda: delattr(obj, attr)))

    patch(engine, "step", "engine.step")
    patch(runner, "execute", "runner.execute")
    patch(runner, "_apply_plan", "runner.apply_plan")
    patch(runner, "_prepare", "runner.prepare")
    if split is not None:
        runner.attention.attend = split.wrap(runner.attention.attend)
        undo.append(lambda: delattr(runner.attention, "attend"))
    if shapes is not None:
        model.forward = shapes.wrap_forward(model.forward)
        model.compute_logits = shapes.wrap_logits(model.compute_logits)
        undo.append(lambda: (delattr(model, "forward"), delattr(model, "compute_logits")))
    for method, name in (("plan", "attention.plan"), ("write_kv", "attention.write_kv"), ("attend", "attention.attend")):
        patch(runner.attention, method, name)
    patch(model, "forward", "model.forward")
    patch(model, "compute_logits", "lm_head")
    patch(model.model.embed_tokens, "forward", "embedding")
    patch(model.model.rotary_emb, "forward", "rotary")
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            patch(module, "forward", "linear")
        elif isinstance(module, llama.RMSNorm):
            patch(module, "forward", "norm")
        elif isinstance(module, llama.LlamaAttention):  # the layer's own choice: torch or C++ (use_cpu_kernels)
            patch(module, "rotate_qk_", "rotary")
        elif isinstance(module, llama.LlamaMLP):
            patch(module, "act_and_mul", "activation")
    sampler = runner.sampler
    runner.sampler = _CallableProxy(sampler, timer.wrap("sampler", sampler.__call__))
    undo.append(lambda: setattr(runner, "sampler", sampler))
    return lambda: [u() for u in reversed(undo)]


def table(timer: RangeTimer, steps: int, wall: float) -> dict:
    by_cat: dict[str, float] = {}
    for name, seconds in timer.exclusive.items():
        by_cat[CATEGORIES[name]] = by_cat.get(CATEGORIES[name], 0.0) + seconds
    by_cat["outside engine.step (generate loop)"] = wall - sum(by_cat.values())
    total = sum(by_cat.values())
    rows = {cat: {"ms_per_step": round(1000 * s / steps, 3), "share": round(s / total, 4), "seconds": round(s, 3)}
            for cat, s in sorted(by_cat.items(), key=lambda kv: -kv[1])}
    ranges = {name: {"ms_per_step": round(1000 * s / steps, 3), "calls": timer.calls[name]}
              for name, s in sorted(timer.exclusive.items(), key=lambda kv: -kv[1])}
    return {"categories": rows, "ranges_exclusive": ranges, "ms_per_step_total": round(1000 * total / steps, 3)}


def format_table(report: dict) -> str:
    lines = [f"{'category':<44} {'ms/step':>9} {'share':>7}"]
    for cat, row in report["profile"]["categories"].items():
        lines.append(f"{cat:<44} {row['ms_per_step']:>9.3f} {100 * row['share']:>6.1f}%")
    lines.append(f"{'total':<44} {report['profile']['ms_per_step_total']:>9.3f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-requests", type=int, default=64, help="the long workload's first N requests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--model", default=None, help="checkpoint (default: the long workload's, built in a temp dir)")
    ap.add_argument("--torch-ops", type=int, default=0, help="also list the top N torch operators by self CPU time")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoConfig

    from quire.cluster import LLM, SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    throughput = _load_sibling("throughput")
    scratch = tempfile.TemporaryDirectory(prefix="quire-step-profile-")
    model_path = args.model or workloads.build_long_model(scratch.name, args.seed)
    config = AutoConfig.from_pretrained(model_path)
    total, input_len, output_len = workloads.WORKLOADS["long"]
    work = throughput.make_workload(total, input_len, output_len, args.seed, config.vocab_size,
                                    workloads.special_ids_of(config))[:args.num_requests]
    # No prefix cache: the same prompts run three times, and later runs would skip their prefill.
    llm = LLM(model=model_path, dtype="float32", seed=args.seed, skip_tokenizer_init=True,
              enable_prefix_caching=False)

    def generate(items):
        params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in items]
        return llm.generate([p for p, _ in items], params, use_tqdm=False)

    # The whole work once, untimed: a fresh engine's first run pays for first touches of its
    # KV pool and allocator arenas, which neither measured run should.
    generate(work)
    probe_before = throughput.speed_probe()
    t0 = time.perf_counter()
    reference = generate(work)
    plain_wall = time.perf_counter() - t0

    timer, split, shapes = RangeTimer(), AttentionSplit(), StepShapes()
    undo = instrument(llm, timer, split, shapes)
    steps_before = llm.engine.stats.num_steps
    t0 = time.perf_counter()
    outputs = generate(work)
    wall = time.perf_counter() - t0
    undo()
    steps = llm.engine.stats.num_steps - steps_before
    probe_after = throughput.speed_probe()
    same = all(list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids) for a, b in zip(outputs, reference))
    report = {
        "config": {"num_requests": len(work), "prompt_tokens": sum(len(p) for p, _ in work),
                   "output_tokens": sum(o for _, o in work), "threads": torch.get_num_threads(),
                   "attention_backend": llm.engine.executor.worker.runner.backend,
                   "model": "long workload's Llama" if args.model is None else args.model},
        "steps": steps, "forward_steps": timer.calls.get("model.forward", 0),
        "instrumented_wall_seconds": round(wall, 3), "uninstrumented_wall_seconds": round(plain_wall, 3),
        "output_tokens_per_s_uninstrumented": round(sum(o for _, o in work) / plain_wall, 2),
        "instrumented_tokens_match_uninstrumented": same,
        "speed_probe_us_before_after": [probe_before, probe_after],
        "profile": table(timer, steps, wall),
        "attention_by_step_kind": split.report(steps),
        "machine_read_gbps": _load_sibling("cpu_attention_bench").read_bandwidth_gbps(),
        "gemm_floor": gemm_floor(llm.engine.executor.worker.runner.model, shapes),
    }
    if args.torch_ops:
        from torch.profiler import ProfilerActivity, profile

        # Driven on this thread: the profiler records the ops of the thread that runs it, and
        # `generate` steps the engine on a thread of its own.
        engine = llm.engine
        for p, o in work:
            engine.add_request(p, SamplingParams(temperature=0, max_tokens=o, ignore_eos=True))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            while engine.has_unfinished():
                engine.step()
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:args.torch_ops]
        report["torch_ops_by_self_cpu"] = [
            {"op": e.key, "calls": e.count, "self_cpu_ms_per_step": round(e.self_cpu_time_total / 1000 / steps, 3)}
            for e in ops]
    llm.shutdown()
    print(format_table(report), file=sys.stderr)
    text = json.dumps(report, indent=2)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
