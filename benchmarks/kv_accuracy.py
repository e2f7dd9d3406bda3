#!/usr/bin/env python
"""Accuracy cost of a quantized paged KV cache (``--kv-cache-dtype int8 | fp8_e4m3``).

For each model family and each quantized KV dtype, the quantized engine is compared with
the unquantized one (``kv_cache_dtype="auto"``; both compute in float32 on the CPU, so the
only difference between them is the KV cache's format). Prompts are ``--num-prompts``
seeded random token-id prompts of ``--prompt-len`` tokens (special tokens excluded); for
the default model the first of them are a few fixed English text prompts instead
(tokenized, BOS included). Measured, per (family, dtype) row:

* **Greedy agreement** (the real engine, ``LLM.generate``): every prompt gets
  ``--max-tokens`` greedy tokens (temperature 0, EOS ignored) from the auto engine and from
  the quantized one. ``exact_match``: share of prompts whose continuations are identical;
  ``position_match``: mean over prompts of the share of positions whose tokens are equal;
  ``common_prefix``: mean over prompts of the number of leading tokens equal before the
  first divergence (``--max-tokens`` when identical).
* **KL divergence** ``KL(p_auto || p_quant)`` of the full-vocabulary next-token
  distributions (softmax of the float32 logits, computed in float64, natural log), teacher
  forced along the auto engine's greedy continuation so both caches hold the same context:
  the worker's model, KV pool (``KVPool`` with the dtype's ``KVCacheSpec``) and attention
  backend are driven directly by a ``ModelRunner`` with hand-built ``StepPlan``s: the
  prompts in one prefill step, then the continuation one token per decode step, all prompts
  batched. The full logits the model computes for sampling (``compute_logits``) are
  recorded at each step: the prefill's last row (predicting continuation token 1) and each
  decode step's row (predicting tokens 2..max_tokens), i.e. ``max_tokens`` distributions
  per prompt. Every one of them attends to K/V read back from the (quantized) paged cache:
  the model's attention writes a step's K/V into the pool before attending over the pool,
  the prefill's included, so the quantized rows differ from auto's only through the cache.
  ``kl_mean``: mean over all prompts and positions; ``kl_max``: the largest single
  position's. ``ref_entropy_mean``: mean entropy of ``p_auto`` (nats), for scale: a
  near-flat distribution has entropy close to ``log(vocab)``.

A row with dtype ``auto`` (``--dtypes auto``) runs the reference against itself: KL 0 and
agreement 1 exactly, a check of the harness.

Families: ``llama``, ``mistral``, ``qwen2`` are tiny random checkpoints (2 layers, hidden
128, GQA, head_dim 32 or 64, seeded, initializer range 0.2, the tiny random model's tokenizer)
built into a temp dir; their distributions come from random weights and are reported as
they are. ``default`` is the checkpoint ``LLM()`` serves when given no model: quire's shipped
default model (4 layers, hidden 256, head_dim 32), trained on the Python standard library, so
its distributions are those of a (small) trained model. Example (a few minutes
on 2 CPU cores):

    python benchmarks/kv_accuracy.py --num-prompts 8 --out kv_accuracy.json
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

FAMILIES = ("llama", "mistral", "qwen2", "default")
DTYPES = ("int8", "fp8_e4m3")
# family → (transformers config class name, overrides of TINY)
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, max_position_embeddings=1024,
            rms_norm_eps=1e-6, initializer_range=0.2)
FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2)),  # head_dim 32
    "mistral": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=64)),
    "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
}
TEXT_PROMPTS = (
    "The quick brown fox jumps over the lazy dog, and then",
    "Return a new list containing all items from the iterable in ascending order.",
    "A dataclass is a class whose main purpose is to hold data; its fields are",
    "Once upon a time, in a small village by the sea, there lived",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of " + ",".join(FAMILIES))
    p.add_argument("--dtypes", default=",".join(DTYPES),
                   help="comma-separated KV dtypes compared with auto (auto itself: the harness check)")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32, help="length of the random token-id prompts")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", help="write the JSON report here")
    args = p.parse_args(argv)
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if unknown := set(args.families) - set(FAMILIES):
        p.error(f"unknown families: {sorted(unknown)}")
    if unknown := set(args.dtypes) - {"auto", *DTYPES}:
        p.error(f"unknown dtypes: {sorted(unknown)}")
    if args.num_prompts < 1 or args.prompt_len < 1 or args.max_tokens < 1:
        p.error("--num-prompts, --prompt-len and --max-tokens must be positive")
    return args


def build_family(family: str, directory: Path, tokenizer_dir: Path) -> Path:
    """Save a tiny random checkpoint of `family` (FAMILY_CONFIGS, seed 0) with the tokenizer."""
    import transformers
    from transformers import AutoTokenizer

    config_name, overrides = FAMILY_CONFIGS[family]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **{**TINY, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(transformers, config_name.replace("Config", "ForCausalLM"))(config).to(torch.float32)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def make_prompts(tokenizer, family: str, num_prompts: int, prompt_len: int, seed: int) -> list[list[int]]:
    """Text prompts first for the default model, then seeded random non-special token ids."""
    prompts = [tokenizer(t)["input_ids"] for t in TEXT_PROMPTS] if family == "default" else []
    prompts = prompts[:num_prompts]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    allowed = [t for t in range(len(tokenizer)) if t not in special]
    rng = random.Random(f"{family}-{seed}")
    while len(prompts) < num_prompts:
        prompts.append([rng.choice(allowed) for _ in range(prompt_len)])
    return prompts


def greedy(model_path: str, kv_cache_dtype: str, prompts: list[list[int]], args) -> list[list[int]]:
    """`args.max_tokens` greedy tokens per prompt (EOS ignored) from the real engine."""
    from quire.cluster import LLM, SamplingParams

    max_len = max(map(len, prompts)) + args.max_tokens
    blocks = len(prompts) * -(-max_len // args.block_size) + 8
    llm = LLM(model=model_path, dtype="float32", kv_cache_dtype=kv_cache_dtype, num_kv_blocks=blocks,
              block_size=args.block_size, max_model_len=max_len, seed=args.seed, enable_prefix_caching=False)
    try:
        outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True),
                               use_tqdm=False)
    finally:
        llm.shutdown()
    return [list(o.outputs[0].token_ids) for o in outputs]


def teacher_forced_logits(model_path: str, kv_cache_dtype: str, prompts: list[list[int]],
                          continuations: list[list[int]], block_size: int) -> torch.Tensor:
    """Full-vocabulary logits `[num_prompts, max_tokens, vocab]` (float32) of the worker's
    model at each continuation position, teacher forced: one prefill step of every prompt,
    then one decode step per continuation token, through a KV pool of `kv_cache_dtype`."""
    from quire.protos import worker_pb2 as pb
    from quire.protos.step import NewRequestData, SamplingSpec, StepPlan
    from quire.worker.kv_pool import KVPool
    from quire.worker.model_runner import ModelRunner
    from quire.worker.sampler import Sampler
    from quire.worker.worker import Worker

    steps = len(continuations[0])
    max_len = max(map(len, prompts)) + steps
    worker = Worker(torch.device("cpu"))
    worker.load_model(pb.LoadModelRequest(model_path=model_path, dtype="float32", rank=0, world_size=1, seed=0,
                                          max_model_len=max_len, kv_cache_dtype=kv_cache_dtype))
    per_request = -(-max_len // block_size)
    pool = KVPool(worker.kv_spec, len(prompts) * per_request, block_size, worker.device)
    runner = ModelRunner(worker.model, worker.ctx, worker.device, pool, worker.attention, Sampler(0))
    captured: list[torch.Tensor] = []
    compute_logits = worker.model.compute_logits

    def capture(hidden):  # an instance attribute shadows the method: the runner's call lands here
        logits = compute_logits(hidden)
        captured.append(logits.float().clone())
        return logits

    worker.model.compute_logits = capture
    handles = list(range(1, len(prompts) + 1))
    plan = StepPlan(step_id=0)
    for i, (handle, prompt) in enumerate(zip(handles, prompts)):
        blocks = list(range(i * per_request, (i + 1) * per_request))
        plan.new_requests.append(NewRequestData(handle, f"kv-accuracy-{i}", list(prompt), SamplingSpec(temperature=0),
                                                blocks, 0))
        plan.num_scheduled_tokens[handle] = len(prompt)
    plans = [plan]
    for k in range(1, steps):
        plans.append(StepPlan(step_id=k, decode_handles=list(handles),
                              decode_token_ids=[c[k - 1] for c in continuations]))
    for plan in plans:
        result = runner.execute(plan)
        if result.errors:
            raise RuntimeError(f"step {plan.step_id} failed: {result.errors}")
    if len(captured) != steps or any(c.shape[0] != len(prompts) for c in captured):
        raise RuntimeError(f"captured {[tuple(c.shape) for c in captured]}, expected {steps} x {len(prompts)} rows")
    pool.check_integrity()
    return torch.stack(captured, dim=1)


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref) || softmax(logits)) over the last dimension, in float64 (nats)."""
    log_p = torch.log_softmax(ref_logits.double(), dim=-1)
    log_q = torch.log_softmax(logits.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).clamp(min=0.0)


def agreement(ref: list[list[int]], other: list[list[int]]) -> dict:
    """Exact-match share, mean share of equal positions, mean common prefix (see the docstring)."""
    prefixes, shares = [], []
    for a, b in zip(ref, other):
        prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefixes.append(prefix)
        shares.append(sum(x == y for x, y in zip(a, b)) / max(len(a), 1))
    n = len(ref)
    return {"exact_match": sum(a == b for a, b in zip(ref, other)) / n, "position_match": sum(shares) / n,
            "common_prefix": sum(prefixes) / n}


def run_family(family: str, model_path: str, args) -> list[dict]:
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    cfg = AutoConfig.from_pretrained(model_path)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    prompts = make_prompts(tokenizer, family, args.num_prompts, args.prompt_len, args.seed)
    started = time.perf_counter()
    ref_tokens = greedy(model_path, "auto", prompts, args)
    ref_logits = teacher_forced_logits(model_path, "auto", prompts, ref_tokens, args.block_size)
    # The runner's own greedy choice along the continuation: the harness follows the engine.
    runner_match = (ref_logits.argmax(dim=-1) == torch.tensor(ref_tokens)).double().mean().item()
    log_p = torch.log_softmax(ref_logits.double(), dim=-1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1).mean().item()
    ref_seconds = time.perf_counter() - started
    rows = []
    for dtype in args.dtypes:
        started = time.perf_counter()
        tokens = greedy(model_path, dtype, prompts, args)
        kl = kl_divergence(ref_logits, teacher_forced_logits(model_path, dtype, prompts, ref_tokens, args.block_size))
        rows.append({
            "family": family, "dtype": dtype, **agreement(ref_tokens, tokens),
            "kl_mean": kl.mean().item(), "kl_max": kl.max().item(), "kl_positions": kl.numel(),
            "ref_entropy_mean": entropy, "log_vocab": math.log(cfg.vocab_size),
            "ref_runner_argmax_match": runner_match,
            "model": {"architecture": (cfg.architectures or ["?"])[0], "hidden_size": cfg.hidden_size,
                      "num_layers": cfg.num_hidden_layers, "num_heads": cfg.num_attention_heads,
                      "num_kv_heads": cfg.num_key_value_heads, "head_dim": head_dim, "vocab_size": cfg.vocab_size},
            "num_prompts": len(prompts), "prompt_lens": sorted({len(p) for p in prompts}),
            "seconds": time.perf_counter() - started, "ref_seconds": ref_seconds,
        })
        print(f"[kv_accuracy] {family} {dtype}: done in {rows[-1]['seconds']:.1f}s", file=sys.stderr, flush=True)
    return rows


def format_table(report: dict) -> str:
    cfg = report["config"]
    lines = [f"{cfg['num_prompts']} prompts x {cfg['max_tokens']} greedy tokens; KL(p_auto || p_quant) teacher forced "
             "(nats); exact: share of prompts identical; pos: share of positions equal; prefix: mean common prefix",
             f"{'family':<9}{'dtype':<10}{'hd':>4}{'exact':>7}{'pos':>7}{'prefix':>8}{'KL mean':>11}{'KL max':>11}"
             f"{'H(p_auto)':>10}{'log V':>7}"]
    for r in report["rows"]:
        lines.append(f"{r['family']:<9}{r['dtype']:<10}{r['model']['head_dim']:>4}{r['exact_match']:>7.2f}"
                     f"{r['position_match']:>7.3f}{r['common_prefix']:>8.1f}{r['kl_mean']:>11.2e}{r['kl_max']:>11.2e}"
                     f"{r['ref_entropy_mean']:>10.2f}{r['log_vocab']:>7.2f}")
    return "\n".join(lines)


def main(argv=None, tokenizer_dir: str | Path | None = None) -> dict:
    """Run the benchmark and return the report; `tokenizer_dir` (default: the default model's) is for tests."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    from quire.cluster.tools.default_model import default_model_dir, tiny_random_model_dir

    bars_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="quire-kv-accuracy-") as tmp:
            for family in args.families:
                if family == "default":
                    path = default_model_dir()
                else:
                    path = build_family(family, Path(tmp) / family, Path(tokenizer_dir or tiny_random_model_dir()))
                print(f"[kv_accuracy] {family}: {args.num_prompts} prompts ...", file=sys.stderr, flush=True)
                rows.extend(run_family(family, str(path), args))
    finally:
        if bars_on:
            hf_logging.enable_progress_bar()
    config = {k: v for k, v in vars(args).items() if k != "out"}
    config.update(engine_dtype="float32", device="cpu", torch_threads=torch.get_num_threads(), argv=sys.argv[1:]
                  if argv is None else list(argv))
    report = {"config": config, "rows": rows, "total_seconds": time.perf_counter() - started}
    print(format_table(report))
    print(f"total {report['total_seconds']:.1f}s")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
