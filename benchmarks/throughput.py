#!/usr/bin/env python
"""Offline throughput: quire vs Hugging Face transformers, same checkpoint, same run.

A synthetic workload of random token-id prompts (special ids excluded) with input and
output lengths drawn uniformly from fixed ranges with a fixed seed. Every request is
greedy and produces exactly its own output length (EOS never stops it). Peers:

* ``quire``             -- ``quire.cluster.LLM.generate`` (continuous batching, paged KV).
* ``hf_generate``       -- ``model.generate`` in static batches of ``--hf-batch-size`` in
                           request order, left padded; each batch runs to its longest
                           output, so only each request's own tokens count as useful
                           (the padding waste is inherent to static batching).
* ``hf_generate_batch`` -- transformers' continuous batching (``ContinuousBatchingManager``,
                           the engine behind ``model.generate_batch``) with a per-request
                           ``max_new_tokens``.

Each peer gets an untimed warm-up first. Reported per peer: wall seconds, useful output
tokens/s and total (prompt + useful output) tokens/s; ratios are quire's throughput over
the peer's. A parity check compares quire's greedy tokens with unbatched HF ``generate``
for the first ``--check-requests`` requests (reported, never fatal).

Example (about a minute on 2 CPU cores with the embedded default model):

    python benchmarks/throughput.py --num-requests 64 --input-len 32:128 --output-len 32:128 \
        --out /tmp/throughput.json
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import logging
import math
import os
import platform
import pstats
import random
import sys
import time
import traceback

import torch

PEERS = ("quire", "hf_generate", "hf_generate_batch")


# --------------------------------------------------------------------------------------------
# CLI and workload
# --------------------------------------------------------------------------------------------

def _range(text: str) -> tuple[int, int]:
    try:
        lo, _, hi = text.partition(":")
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX, got {text!r}") from None
    if lo < 1 or hi < lo:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


def _peers(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in PEERS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"peers must be a subset of {','.join(PEERS)}; got {text!r}")
    return list(dict.fromkeys(names))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="checkpoint directory (default: quire's embedded default checkpoint)")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", type=_range, default=(32, 128), metavar="MIN:MAX")
    ap.add_argument("--output-len", type=_range, default=(32, 128), metavar="MIN:MAX")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf-batch-size", type=int, default=16, help="static batch size of HF generate")
    ap.add_argument("--max-num-seqs", type=int, default=256, help="quire (and HF CB) cap on running requests")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048,
                    help="quire (and HF CB) token budget per step")
    ap.add_argument("--peers", type=_peers, default=list(PEERS), help=f"subset of {','.join(PEERS)}")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--hf-attn", default="sdpa", help="attn_implementation for HF generate (default sdpa)")
    ap.add_argument("--hf-cb-attn", default="sdpa",
                    help="attn_implementation for HF continuous batching: sdpa or paged|eager (default sdpa)")
    ap.add_argument("--hf-cb-page-size", type=int, default=256, help="HF continuous batching KV page size")
    ap.add_argument("--check-requests", type=int, default=4,
                    help="requests whose greedy tokens are compared with unbatched HF generate (0: skip)")
    ap.add_argument("--warmup-requests", type=int, default=4)
    ap.add_argument("--profile", action="store_true",
                    help="also run quire once more under cProfile (untimed) and report its top functions")
    ap.add_argument("--profile-top", type=int, default=25)
    ap.add_argument("--out", default=None, help="write the JSON here (it is always printed to stdout)")
    args = ap.parse_args(argv)
    if args.num_requests < 1 or args.hf_batch_size < 1:
        ap.error("--num-requests and --hf-batch-size must be >= 1")
    return args


def special_ids(tokenizer, config) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        for obj in (tokenizer, config):
            v = getattr(obj, name, None)
            ids.update(v if isinstance(v, (list, tuple)) else [] if v is None else [v])
    ids.update(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return {int(i) for i in ids}


def make_workload(num_requests: int, input_len: tuple[int, int], output_len: tuple[int, int], seed: int,
                  vocab_size: int, excluded: set[int]) -> list[tuple[list[int], int]]:
    """`num_requests` (prompt token ids, output length) pairs, reproducible from `seed`."""
    rng = random.Random(seed)
    allowed = [t for t in range(vocab_size) if t not in excluded]
    work = []
    for _ in range(num_requests):
        p_len = rng.randint(*input_len)
        o_len = rng.randint(*output_len)
        work.append(([rng.choice(allowed) for _ in range(p_len)], o_len))
    return work


def throughput(wall: float, prompt_tokens: int, useful_output: int) -> dict:
    return {
        "wall_seconds": round(wall, 4),
        "output_tokens_per_s": round(useful_output / wall, 2) if wall > 0 else None,
        "total_tokens_per_s": round((prompt_tokens + useful_output) / wall, 2) if wall > 0 else None,
        "requests_per_s": None,
    }


# --------------------------------------------------------------------------------------------
# quire
# --------------------------------------------------------------------------------------------

def _stats_snapshot(stats) -> dict:
    return {k: getattr(stats, k) for k in ("num_steps", "forward_seconds", "step_seconds", "generated_tokens",
                                           "prompt_tokens")}


def run_quire(args, model_path: str, work) -> tuple[dict, list[list[int]], object]:
    from quire.cluster import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=model_path, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              dtype=args.dtype, seed=args.seed)
    init_seconds = time.perf_counter() - t0

    warm = work[:max(1, args.warmup_requests)]
    llm.generate([p for p, _ in warm], [SamplingParams(temperature=0, max_tokens=min(o, 8), ignore_eos=True)
                                        for _, o in warm], use_tqdm=False)

    prompts = [p for p, _ in work]
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in work]
    before = _stats_snapshot(llm.engine.stats)
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    after = _stats_snapshot(llm.engine.stats)
    delta = {k: after[k] - before[k] for k in after}

    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    prompt_tokens = sum(len(p) for p in prompts)
    useful = sum(min(len(t), o) for t, (_, o) in zip(tokens, work))
    res = throughput(wall, prompt_tokens, useful)
    res["requests_per_s"] = round(len(work) / wall, 3)
    res.update({
        "init_seconds": round(init_seconds, 3),
        "useful_output_tokens": useful,
        "computed_output_tokens": sum(len(t) for t in tokens),
        "prompt_tokens": prompt_tokens,
        "length_mismatches": sum(len(t) != o for t, (_, o) in zip(tokens, work)),
        "engine_stats": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in delta.items()},
        "forward_seconds": round(delta["forward_seconds"], 4),
        "step_seconds": round(delta["step_seconds"], 4),
        "seconds_in_step_outside_forward": round(delta["step_seconds"] - delta["forward_seconds"], 4),
        "seconds_outside_step": round(wall - delta["step_seconds"], 4),
        "overhead_outside_forward": round(1 - delta["forward_seconds"] / wall, 4),
        "mean_step_ms": round(1000 * delta["step_seconds"] / max(delta["num_steps"], 1), 3),
        "mean_forward_ms": round(1000 * delta["forward_seconds"] / max(delta["num_steps"], 1), 3),
    })
    return res, tokens, llm


def profile_quire(llm, work, top: int) -> dict:
    """One more (untimed) quire run under cProfile; top functions by own time and cumulative time."""
    from quire.cluster import SamplingParams

    prompts = [p for p, _ in work]
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in work]
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    llm.generate(prompts, params, use_tqdm=False)
    prof.disable()
    wall = time.perf_counter() - t0
    st = pstats.Stats(prof)
    rows = []
    for (file, line, func), (cc, nc, tt, ct, _) in st.stats.items():
        rows.append({"function": f"{_short(file)}:{line}({func})", "calls": nc, "tottime": round(tt, 4),
                     "cumtime": round(ct, 4)})
    by_tot = sorted(rows, key=lambda r: -r["tottime"])[:top]
    by_cum = sorted((r for r in rows if "quire" in r["function"] or "protobuf" in r["function"]
                     or "tokeniz" in r["function"]), key=lambda r: -r["cumtime"])[:top]
    return {"profiled_wall_seconds": round(wall, 3), "top_by_tottime": by_tot, "top_quire_by_cumtime": by_cum,
            "note": "cProfile inflates Python-level costs; use it for ranking, not absolute numbers"}


def _short(path: str) -> str:
    for marker in ("site-packages/", "/work/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


# --------------------------------------------------------------------------------------------
# Hugging Face
# --------------------------------------------------------------------------------------------

def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.CRITICAL)


def load_hf(model_path: str, dtype: str, attn: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype), attn_implementation=attn)
    model.eval()
    # Disable EOS everywhere: every row must emit exactly its output length, through EOS tokens,
    # as quire does with ignore_eos=True. (min_new_tokens would instead *ban* EOS, changing tokens.)
    model.generation_config.eos_token_id = None
    return model


def _hf_gen_config(max_new_tokens: int, pad_id: int):
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id,
                            eos_token_id=None, temperature=None, top_p=None, top_k=None)


@torch.inference_mode()
def hf_generate_batch_static(model, batch: list[tuple[list[int], int]], pad_id: int) -> tuple[list[list[int]], int]:
    """One left-padded static batch run to its longest output; returns each row's own tokens
    and the number of output tokens computed (rows x max output)."""
    max_prompt = max(len(p) for p, _ in batch)
    max_new = max(o for _, o in batch)
    ids = torch.full((len(batch), max_prompt), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), max_prompt), dtype=torch.long)
    for row, (p, _) in enumerate(batch):
        ids[row, max_prompt - len(p):] = torch.tensor(p)
        mask[row, max_prompt - len(p):] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=_hf_gen_config(max_new, pad_id))
    gen = out[:, max_prompt:]
    if gen.shape[1] != max_new:
        raise RuntimeError(f"HF generate returned {gen.shape[1]} new tokens, expected {max_new} (EOS not disabled?)")
    return [gen[row, :o].tolist() for row, (_, o) in enumerate(batch)], gen.numel()


def run_hf_generate(args, model, work, pad_id: int) -> tuple[dict, list[list[int]]]:
    warm = [(p, min(o, 8)) for p, o in work[:max(1, args.warmup_requests)]]
    hf_generate_batch_static(model, warm, pad_id)

    tokens, computed = [], 0
    t0 = time.perf_counter()
    for start in range(0, len(work), args.hf_batch_size):
        toks, n = hf_generate_batch_static(model, work[start:start + args.hf_batch_size], pad_id)
        tokens.extend(toks)
        computed += n
    wall = time.perf_counter() - t0
    prompt_tokens = sum(len(p) for p, _ in work)
    useful = sum(len(t) for t in tokens)
    res = throughput(wall, prompt_tokens, useful)
    res["requests_per_s"] = round(len(work) / wall, 3)
    res.update({
        "batch_size": args.hf_batch_size,
        "num_batches": math.ceil(len(work) / args.hf_batch_size),
        "useful_output_tokens": useful,
        "computed_output_tokens": computed,
        "padded_output_waste": round(1 - useful / computed, 4) if computed else None,
        "prompt_tokens": prompt_tokens,
        "attn_implementation": model.config._attn_implementation,
    })
    return res, tokens


def _cb_run(model, work, args, pad_id: int) -> tuple[list[list[int]], dict]:
    """Run `work` through transformers' continuous batching with a per-request max_new_tokens.
    Returns per-request tokens (request order) and timings."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.continuous_api import WorkloadHints

    page = args.hf_cb_page_size
    # Size the cache explicitly: on the CPU, auto-sizing reads host memory (needs psutil) and
    # may allocate gigabytes. Every request fits at once, so nothing is ever evicted.
    num_blocks = sum(math.ceil((len(p) + o) / page) for p, o in work) + 2
    cb_config = ContinuousBatchingConfig(
        page_size=page, num_blocks=num_blocks, max_batch_tokens=args.max_num_batched_tokens,
        max_requests_per_batch=args.max_num_seqs, allow_block_sharing=False, seed=args.seed,
        auto_switch_to_flash=False)
    gen_config = GenerationConfig(max_new_tokens=max(o for _, o in work), do_sample=False, eos_token_id=-1,
                                  pad_token_id=pad_id, temperature=None, top_p=None, top_k=None)
    hints = WorkloadHints(max_prompt_length=max(len(p) for p, _ in work),
                          max_generated_length=max(o for _, o in work), num_requests=len(work))
    t_enter = time.perf_counter()
    results = {}
    with model.continuous_batching_context_manager(generation_config=gen_config, continuous_batching_config=cb_config,
                                                   block=True, timeout=10, workload_hints=hints) as manager:
        t_start = time.perf_counter()
        ids = [manager.add_request(input_ids=p, request_id=f"r{i}", max_new_tokens=o, eos_token_id=-1)
               for i, (p, o) in enumerate(work)]
        if any(i is None for i in ids):
            raise RuntimeError("continuous batching manager refused a request")
        while len(results) < len(work):
            out = manager.get_result(timeout=1)
            if out is None:
                if not manager.is_running():
                    raise RuntimeError("HF continuous batching thread stopped with requests pending")
                continue
            if out.is_finished():
                if out.error is not None:
                    raise RuntimeError(f"HF continuous batching request {out.request_id} failed: {out.error}")
                results[out.request_id] = out
        t_done = time.perf_counter()
    t_exit = time.perf_counter()
    tokens = [list(results[f"r{i}"].generated_tokens) for i in range(len(work))]
    return tokens, {"generation_seconds": t_done - t_start, "setup_seconds": t_start - t_enter,
                    "teardown_seconds": t_exit - t_done, "num_blocks": num_blocks, "page_size": page}


def run_hf_generate_batch(args, model_path: str, work, pad_id: int) -> tuple[dict, list[list[int]]]:
    model = load_hf(model_path, args.dtype, args.hf_cb_attn)
    _cb_run(model, [(p, min(o, 8)) for p, o in work[:max(1, args.warmup_requests)]], args, pad_id)  # warm-up
    tokens, timing = _cb_run(model, work, args, pad_id)
    wall = timing["generation_seconds"]
    prompt_tokens = sum(len(p) for p, _ in work)
    useful = sum(min(len(t), o) for t, (_, o) in zip(tokens, work))
    res = throughput(wall, prompt_tokens, useful)
    res["requests_per_s"] = round(len(work) / wall, 3)
    res.update({
        "wall_seconds_with_setup_teardown": round(timing["setup_seconds"] + wall + timing["teardown_seconds"], 4),
        "setup_seconds": round(timing["setup_seconds"], 4),
        "teardown_seconds": round(timing["teardown_seconds"], 4),
        "useful_output_tokens": useful,
        "computed_output_tokens": sum(len(t) for t in tokens),
        "prompt_tokens": prompt_tokens,
        "length_mismatches": sum(len(t) != o for t, (_, o) in zip(tokens, work)),
        "attn_implementation": model.config._attn_implementation,
        "page_size": timing["page_size"], "num_blocks": timing["num_blocks"],
        "per_request_max_new_tokens": True,
        "note": "wall_seconds = first add_request to last result; manager start/stop reported separately",
    })
    return res, tokens


@torch.inference_mode()
def hf_reference(model, work, n: int, pad_id: int) -> list[list[int]]:
    """Unbatched, unpadded HF greedy tokens for the first `n` requests."""
    refs = []
    for p, o in work[:n]:
        out = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             generation_config=_hf_gen_config(o, pad_id))
        refs.append(out[0, len(p):].tolist())
    return refs


def compare(tokens: list[list[int]], refs: list[list[int]]) -> dict:
    per = []
    for got, want in zip(tokens, refs):
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if first is None and len(got) != len(want):
            first = min(len(got), len(want))
        per.append(first)
    return {"checked": len(per), "exact_matches": sum(f is None for f in per),
            "first_mismatch_position": per}


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def machine_info() -> dict:
    import transformers

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "cpu_affinity": affinity,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cuda_available": torch.cuda.is_available()}


def _error(exc: BaseException) -> dict:
    return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    _quiet_transformers()
    from transformers import AutoConfig, AutoTokenizer

    if args.model is None:
        from quire.cluster.default_model import default_model_dir

        model_path = str(default_model_dir())
    else:
        model_path = args.model
    hf_config = AutoConfig.from_pretrained(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    vocab = min(hf_config.vocab_size, len(tokenizer))
    excluded = special_ids(tokenizer, hf_config)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = next(iter(sorted(excluded)), 0)
    work = make_workload(args.num_requests, args.input_len, args.output_len, args.seed, vocab, excluded)

    torch.manual_seed(args.seed)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "out"}
    config.update({"model": model_path, "vocab_size": vocab, "excluded_special_ids": sorted(excluded),
                   "total_prompt_tokens": sum(len(p) for p, _ in work),
                   "total_output_tokens": sum(o for _, o in work)})
    report = {"config": config, "results": {}, "ratios": {}, "quire_overhead_outside_forward": None,
              "machine": machine_info()}
    outputs: dict[str, list[list[int]]] = {}
    llm = None

    def log(msg):
        print(f"[throughput] {msg}", file=sys.stderr, flush=True)

    log(f"{len(work)} requests, {config['total_prompt_tokens']} prompt + {config['total_output_tokens']} output "
        f"tokens, model {model_path}, {torch.get_num_threads()} threads")
    if "quire" in args.peers:
        log("quire ...")
        try:
            res, outputs["quire"], llm = run_quire(args, model_path, work)
            report["results"]["quire"] = res
            report["quire_overhead_outside_forward"] = res["overhead_outside_forward"]
            log(f"quire: {res['wall_seconds']:.2f}s, {res['output_tokens_per_s']} out tok/s")
        except Exception as exc:  # noqa: BLE001 -- a broken peer is recorded, the others still run
            report["results"]["quire"] = _error(exc)

    hf_model = None
    if "hf_generate" in args.peers or (args.check_requests and "quire" in outputs):
        try:
            hf_model = load_hf(model_path, args.dtype, args.hf_attn)
        except Exception as exc:  # noqa: BLE001
            report["results"]["hf_generate"] = _error(exc)
    if "hf_generate" in args.peers and hf_model is not None:
        log("hf_generate ...")
        try:
            res, outputs["hf_generate"] = run_hf_generate(args, hf_model, work, pad_id)
            report["results"]["hf_generate"] = res
            log(f"hf_generate: {res['wall_seconds']:.2f}s, {res['output_tokens_per_s']} out tok/s")
        except Exception as exc:  # noqa: BLE001
            report["results"]["hf_generate"] = _error(exc)

    if "hf_generate_batch" in args.peers:
        log("hf_generate_batch ...")
        try:
            res, outputs["hf_generate_batch"] = run_hf_generate_batch(args, model_path, work, pad_id)
            report["results"]["hf_generate_batch"] = res
            log(f"hf_generate_batch: {res['wall_seconds']:.2f}s, {res['output_tokens_per_s']} out tok/s")
        except Exception as exc:  # noqa: BLE001
            report["results"]["hf_generate_batch"] = _error(exc)

    # Parity: greedy tokens of every peer vs unbatched, unpadded HF generate.
    n_check = min(args.check_requests, len(work))
    if n_check and hf_model is not None and outputs:
        try:
            refs = hf_reference(hf_model, work, n_check, pad_id)
            report["parity_vs_hf_unbatched"] = {name: compare(toks[:n_check], refs) for name, toks in outputs.items()}
            if "quire" in outputs:
                report["quire_greedy_matches_hf"] = report["parity_vs_hf_unbatched"]["quire"]["exact_matches"]
        except Exception as exc:  # noqa: BLE001
            report["parity_vs_hf_unbatched"] = _error(exc)

    q = report["results"].get("quire", {})
    for name in ("hf_generate", "hf_generate_batch"):
        peer = report["results"].get(name, {})
        if q.get("output_tokens_per_s") and peer.get("output_tokens_per_s"):
            report["ratios"][f"quire/{name}"] = {
                "output_tokens_per_s": round(q["output_tokens_per_s"] / peer["output_tokens_per_s"], 3),
                "total_tokens_per_s": round(q["total_tokens_per_s"] / peer["total_tokens_per_s"], 3),
            }

    if args.profile and llm is not None:
        log("profiling quire ...")
        try:
            report["quire_profile"] = profile_quire(llm, work, args.profile_top)
        except Exception as exc:  # noqa: BLE001
            report["quire_profile"] = _error(exc)
    if llm is not None:
        with contextlib.suppress(Exception):
            llm.shutdown()

    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
