#!/usr/bin/env python
"""Offline throughput: quire vs Hugging Face transformers, same checkpoint, same run.

A synthetic workload of random token-id prompts (special ids excluded) with input and
output lengths drawn uniformly from fixed ranges with a fixed seed. Every request is
greedy and produces exactly its own output length (EOS never stops it). Peers:

* ``quire``             -- ``quire.cluster.LLM.generate`` (continuous batching, paged KV),
                           prefix cache off: every timed run repeats the same prompts, and
                           a cached run would skip the prefill the peers must compute.
* ``hf_generate``       -- ``model.generate`` in static batches of ``--hf-batch-size`` in
                           request order, left padded; each batch runs to its longest
                           output, so only each request's own tokens count as useful
                           (the padding waste is inherent to static batching).
* ``hf_generate_batch`` -- transformers' continuous batching (``ContinuousBatchingManager``,
                           the engine behind ``model.generate_batch``) with a per-request
                           ``max_new_tokens``; timed from the first request added to the
                           last result (manager start/stop reported separately).

Each peer is set up and warmed up once (untimed); then the timed runs are interleaved
(quire, hf_generate, hf_generate_batch, quire, ...) ``--repeats`` times and the median
wall time is reported. Reported per peer: wall seconds, useful output tokens/s, total
(prompt + useful output) tokens/s; ratios are quire's throughput over the peer's. A
parity check compares every peer's greedy tokens with unbatched HF ``generate`` for the
first ``--check-requests`` requests (reported, never fatal).

A fixed matmul "speed probe" runs before and after every timed run: if the machine
slows down under sustained load (shared or burst-credited vCPUs), the probe shows it
(``speed_probe_us``) and the report carries a warning. On small VMs ``--threads 1``
often gives steadier (and no slower) numbers than two OpenMP threads.

``--workload long`` (``throughput_workloads``) swaps in longer requests on a larger model
built on the fly: 64 requests, prompts 32-512, outputs 16-256, a random 6-layer 768-hidden
GQA 12:4 Llama with a 32k vocabulary and no tokenizer (token-id prompts). It also lets HF
generate try static batch sizes 8, 16, 32, 64 and report the best (``--hf-batch-sizes``).
``--attention-share`` adds one more, instrumented quire run that times the attention
backend's ``write_kv`` + ``attend`` (``quire_attention_share``).

Example (quire's shipped default model, about a minute on 2 CPU cores):

    python benchmarks/throughput.py --num-requests 64 --input-len 32:128 --output-len 32:128 \
        --threads 1 --out /tmp/throughput.json
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib.util
import json
import os
import pathlib
import platform
import pstats
import random
import statistics
import sys
import time
import traceback

import torch

from quire.cluster.tools.bench_serve import parse_range

_spec = importlib.util.spec_from_file_location("throughput_workloads",  # a sibling script, not a package
                                               pathlib.Path(__file__).with_name("throughput_workloads.py"))
_workloads = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_workloads)
WORKLOADS, AttentionTimer = _workloads.WORKLOADS, _workloads.AttentionTimer
_spec = importlib.util.spec_from_file_location("throughput_hf", pathlib.Path(__file__).with_name("throughput_hf.py"))
_hf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_hf)
(HFGeneratePeer, HFGenerateBatchPeer, hf_reference, load_hf, warmup_work,
 _quiet_transformers) = (_hf.HFGeneratePeer, _hf.HFGenerateBatchPeer, _hf.hf_reference, _hf.load_hf,
                         _hf.warmup_work, _hf.quiet_transformers)

PEERS = ("quire", "hf_generate", "hf_generate_batch")


# --------------------------------------------------------------------------------------------
# CLI and workload
# --------------------------------------------------------------------------------------------

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
                    help="checkpoint directory (default: quire's shipped default model)")
    ap.add_argument("--workload", choices=("default", *WORKLOADS), default="default",
                    help="'long': longer requests on a built 6-layer 32k-vocab GQA Llama (sets the lengths below "
                         "unless given, and --hf-batch-sizes 8,16,32,64)")
    ap.add_argument("--num-requests", type=int, default=None, help="default 64")
    ap.add_argument("--input-len", type=parse_range, default=None, metavar="MIN:MAX", help="default 32:128")
    ap.add_argument("--output-len", type=parse_range, default=None, metavar="MIN:MAX", help="default 32:128")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf-batch-size", type=int, default=16, help="static batch size of HF generate")
    ap.add_argument("--hf-batch-sizes", type=lambda t: [int(x) for x in t.split(",") if x.strip()], default=None,
                    help="HF generate tries each of these static batch sizes per run and reports the best")
    ap.add_argument("--attention-share", action="store_true",
                    help="one more (untimed, instrumented) quire run timing the attention backend's calls")
    ap.add_argument("--max-num-seqs", type=int, default=256,
                    help="quire's cap on running requests (also HF CB max_requests_per_batch)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048,
                    help="quire's token budget per step (also HF CB max_batch_tokens)")
    ap.add_argument("--peers", type=_peers, default=list(PEERS), help=f"subset of {','.join(PEERS)}")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "int8", "fp8_e4m3"),
                    help="quire's KV cache format (auto: the model's dtype; int8/fp8_e4m3: quantized pages, so "
                         "tokens may differ from HF's: the parity check reports it)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per peer, interleaved; median reported")
    ap.add_argument("--hf-attn", default="sdpa", help="attn_implementation for HF generate (default sdpa)")
    ap.add_argument("--hf-cb-attn", default="sdpa",
                    help="attn_implementation for HF continuous batching: sdpa or paged|eager (default sdpa)")
    ap.add_argument("--hf-cb-page-size", type=int, default=256, help="HF continuous batching KV page size")
    ap.add_argument("--check-requests", type=int, default=4,
                    help="requests whose greedy tokens are compared with unbatched HF generate (0: skip)")
    ap.add_argument("--warmup-requests", type=int, default=8,
                    help="untimed warm-up: this many requests, full prompts, at most 4 output tokens")
    ap.add_argument("--profile", action="store_true",
                    help="also run quire once more under cProfile (untimed) and report its top functions")
    ap.add_argument("--profile-top", type=int, default=25)
    ap.add_argument("--out", default=None, help="write the JSON here (it is always printed to stdout)")
    args = _workloads.apply_preset(ap.parse_args(argv))
    if args.num_requests < 1 or min(args.hf_batch_sizes) < 1 or args.repeats < 1:
        ap.error("--num-requests, --hf-batch-size(s) and --repeats must be >= 1")
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")
    return args


def special_ids(tokenizer, config) -> set[int]:
    """Token ids prompts must avoid: the tokenizer's special and added ids (None: none) and the
    config's bos/eos/pad."""
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


_PROBE = {}


def speed_probe() -> float:
    """Microseconds per fixed small matmul (median of 30): a thermometer for machine slowdowns."""
    if not _PROBE:
        gen = torch.Generator().manual_seed(0)
        _PROBE["a"] = torch.randn(64, 256, generator=gen)
        _PROBE["w"] = torch.randn(1024, 256, generator=gen)
    a, w = _PROBE["a"], _PROBE["w"]
    times = []
    for _ in range(30):
        t = time.perf_counter()
        torch.nn.functional.linear(a, w)
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1e6, 1)


# --------------------------------------------------------------------------------------------
# Peers: setup() once (untimed, includes warm-up), run() per timed repeat -> tokens, extras
# --------------------------------------------------------------------------------------------

class QuirePeer:
    name = "quire"

    def __init__(self, args, model_path: str, work):
        self.args, self.model_path, self.work = args, model_path, work
        self.llm = None

    def setup(self) -> dict:
        from quire.cluster import LLM

        t0 = time.perf_counter()
        self.llm = LLM(model=self.model_path, max_num_seqs=self.args.max_num_seqs,
                       max_num_batched_tokens=self.args.max_num_batched_tokens, dtype=self.args.dtype,
                       seed=self.args.seed, skip_tokenizer_init=self.args.skip_tokenizer_init,
                       kv_cache_dtype=self.args.kv_cache_dtype,
                       # Every timed run repeats the same prompts: with the prefix cache on, a
                       # run would find the previous run's blocks and skip its prefill, which no
                       # HF peer can. (These prompts share no prefix within a run.)
                       enable_prefix_caching=False)
        init = time.perf_counter() - t0
        self._generate(warmup_work(self.work, self.args.warmup_requests))
        return {"init_seconds": round(init, 3), "kv_cache_dtype": self.args.kv_cache_dtype}

    def _generate(self, work):
        from quire.cluster import SamplingParams

        params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in work]
        return self.llm.generate([p for p, _ in work], params, use_tqdm=False)

    def run(self):
        stats = self.llm.engine.stats
        keys = ("num_steps", "forward_seconds", "step_seconds", "generated_tokens", "prompt_tokens")
        before = {k: getattr(stats, k) for k in keys}
        t0 = time.perf_counter()
        outputs = self._generate(self.work)
        wall = time.perf_counter() - t0
        d = {k: getattr(stats, k) - before[k] for k in keys}
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        extras = {
            "engine_stats": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()},
            "forward_seconds": round(d["forward_seconds"], 4),
            "seconds_in_step_outside_forward": round(d["step_seconds"] - d["forward_seconds"], 4),
            "seconds_outside_step": round(wall - d["step_seconds"], 4),
            "overhead_outside_forward": round(1 - d["forward_seconds"] / wall, 4),
            "mean_step_ms": round(1000 * d["step_seconds"] / max(d["num_steps"], 1), 3),
            "mean_forward_ms": round(1000 * d["forward_seconds"] / max(d["num_steps"], 1), 3),
        }
        return wall, tokens, extras

    def attention_share(self) -> dict:
        return _workloads.attention_share(self.llm, lambda: self._generate(self.work))

    def profile(self, top: int) -> dict:
        """One more (untimed) run under cProfile: top functions by own time, and quire/protobuf/
        tokenizer functions by cumulative time."""
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        self._generate(self.work)
        prof.disable()
        wall = time.perf_counter() - t0
        rows = []
        for (file, line, func), (_, nc, tt, ct, _) in pstats.Stats(prof).stats.items():
            rows.append({"function": f"{_short(file)}:{line}({func})", "calls": nc, "tottime": round(tt, 4),
                         "cumtime": round(ct, 4)})
        by_tot = sorted(rows, key=lambda r: -r["tottime"])[:top]
        ours = [r for r in rows if any(s in r["function"] for s in ("cluster/", "protos/", "worker/", "kernels/",
                                                                    "protobuf", "tokeniz"))]
        by_cum = sorted(ours, key=lambda r: -r["cumtime"])[:top]
        return {"profiled_wall_seconds": round(wall, 3), "top_by_tottime": by_tot, "top_quire_by_cumtime": by_cum,
                "note": "cProfile inflates Python-level costs; use it for ranking, not absolute numbers"}

    def close(self):
        if self.llm is not None:
            with contextlib.suppress(Exception):
                self.llm.shutdown()


_REPOSITORY = str(pathlib.Path(__file__).resolve().parent.parent) + "/"


def _short(path: str) -> str:
    """A profiled function's file, relative to site-packages or to this repository."""
    for marker in ("site-packages/", _REPOSITORY):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def compare(tokens: list[list[int]], refs: list[list[int]]) -> dict:
    per = []
    for got, want in zip(tokens, refs):
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if first is None and len(got) != len(want):
            first = min(len(got), len(want))
        per.append(first)
    return {"checked": len(per), "exact_matches": sum(f is None for f in per), "first_mismatch_position": per}


def summarize(runs: list[dict], work, tokens: list[list[int]], setup: dict) -> dict:
    """Median-wall run's figures plus every run's wall time."""
    walls = [r["wall"] for r in runs]
    median_run = sorted(runs, key=lambda r: r["wall"])[(len(runs) - 1) // 2]
    wall = median_run["wall"]
    prompt_tokens = sum(len(p) for p, _ in work)
    useful = sum(min(len(t), o) for t, (_, o) in zip(tokens, work))
    res = {
        "wall_seconds": round(wall, 4),
        "output_tokens_per_s": round(useful / wall, 2),
        "total_tokens_per_s": round((prompt_tokens + useful) / wall, 2),
        "requests_per_s": round(len(work) / wall, 3),
        "useful_output_tokens": useful,
        "prompt_tokens": prompt_tokens,
        "length_mismatches": sum(len(t) != o for t, (_, o) in zip(tokens, work)),
        "wall_seconds_all_runs": [round(w, 4) for w in walls],
        "speed_probe_us_around_runs": [r["probe"] for r in runs],
        "cpu_steal_share_runs": [None if r["steal"] is None else round(r["steal"], 4) for r in runs],  # CPU time the hypervisor gave to other guests
    }
    res.update(setup)
    res.update(median_run["extras"])
    res.setdefault("computed_output_tokens", sum(len(t) for t in tokens))
    return res


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


def log(msg: str) -> None:
    print(f"[throughput] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    _quiet_transformers()
    from transformers import AutoConfig, AutoTokenizer

    model_path, _scratch = _workloads.checkpoint(args)  # _scratch: a built checkpoint's directory, kept to the end
    hf_config = AutoConfig.from_pretrained(model_path)
    # A checkpoint without a tokenizer takes token-id prompts only (quire: skip_tokenizer_init).
    args.skip_tokenizer_init = not _workloads.has_tokenizer(model_path)
    tokenizer = None if args.skip_tokenizer_init else AutoTokenizer.from_pretrained(model_path)
    vocab = hf_config.vocab_size if tokenizer is None else min(hf_config.vocab_size, len(tokenizer))
    excluded = special_ids(tokenizer, hf_config)
    pad_id = hf_config.pad_token_id if tokenizer is None else tokenizer.pad_token_id
    if pad_id is None:
        pad_id = min(excluded) if excluded else 0
    work = make_workload(args.num_requests, args.input_len, args.output_len, args.seed, vocab, excluded)
    torch.manual_seed(args.seed)

    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "out"}
    config.update({"model": model_path, "vocab_size": vocab, "excluded_special_ids": sorted(excluded),
                   "total_prompt_tokens": sum(len(p) for p, _ in work),
                   "total_output_tokens": sum(o for _, o in work), "argv": sys.argv[1:]})
    report = {"config": config, "results": {}, "ratios": {}, "quire_overhead_outside_forward": None,
              "machine": machine_info(), "warnings": []}
    log(f"{len(work)} requests, {config['total_prompt_tokens']} prompt + {config['total_output_tokens']} output "
        f"tokens, model {model_path}, {torch.get_num_threads()} threads")

    # The unbatched HF reference model doubles as the hf_generate peer's model.
    need_ref = args.check_requests > 0
    hf_model, hf_load_seconds = None, None
    if "hf_generate" in args.peers or need_ref:
        try:
            t0 = time.perf_counter()
            hf_model = load_hf(model_path, args.dtype, args.hf_attn)
            hf_load_seconds = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 -- recorded; other peers still run
            report["results"]["hf_generate"] = _error(exc)

    peers = {}
    for name in args.peers:
        if name == "quire":
            peers[name] = QuirePeer(args, model_path, work)
        elif name == "hf_generate":
            if hf_model is not None:
                peers[name] = HFGeneratePeer(args, model_path, work, pad_id, hf_model, hf_load_seconds)
        else:
            peers[name] = HFGenerateBatchPeer(args, model_path, work, pad_id)

    setups, runs, tokens = {}, {name: [] for name in peers}, {}
    for name in list(peers):
        log(f"{name}: setup and warm-up ...")
        try:
            setups[name] = peers[name].setup()
        except Exception as exc:  # noqa: BLE001
            report["results"][name] = _error(exc)
            del peers[name]

    for rep in range(args.repeats):
        for name in list(peers):
            before, ticks = speed_probe(), _workloads.cpu_ticks()
            try:
                wall, toks, extras = peers[name].run()
            except Exception as exc:  # noqa: BLE001
                report["results"][name] = _error(exc)
                del peers[name]
                continue
            steal = _workloads.steal_share(ticks, _workloads.cpu_ticks())
            after = speed_probe()
            runs[name].append({"wall": wall, "extras": extras, "probe": [before, after], "steal": steal})
            tokens.setdefault(name, toks)
            log(f"{name} run {rep + 1}/{args.repeats}: {wall:.2f}s "
                f"(speed probe {before:.0f} -> {after:.0f} us, cpu steal {steal if steal is None else round(steal, 4)})")

    for name in peers:
        report["results"][name] = summarize(runs[name], work, tokens[name], setups[name])

    probes = [p for name in peers for r in runs[name] for p in r["probe"]]
    if probes and max(probes) > 2.5 * min(probes):
        report["warnings"].append(
            f"speed probe varied {min(probes):.0f}..{max(probes):.0f} us across timed runs: the machine slowed "
            "down during the benchmark (throttled or shared CPU); try --threads 1, --repeats, or a quieter machine")
    report["speed_probe_us"] = {"min": min(probes, default=None), "max": max(probes, default=None)}

    n_check = min(args.check_requests, len(work))
    if n_check and hf_model is not None and tokens:
        try:
            refs = hf_reference(hf_model, work, n_check, pad_id)
            report["parity_vs_hf_unbatched"] = {name: compare(t[:n_check], refs) for name, t in tokens.items()}
            if "quire" in tokens:
                report["quire_greedy_matches_hf"] = (f"{report['parity_vs_hf_unbatched']['quire']['exact_matches']}"
                                                     f"/{n_check}")
        except Exception as exc:  # noqa: BLE001
            report["parity_vs_hf_unbatched"] = _error(exc)
    if "quire" in tokens:
        # Free extra evidence: every request, quire vs each HF peer's (batched) output.
        report["quire_vs_peer_all_requests"] = {
            name: {k: v for k, v in compare(tokens["quire"], t).items() if k != "first_mismatch_position"}
            for name, t in tokens.items() if name != "quire"}

    q = report["results"].get("quire", {})
    if "overhead_outside_forward" in q:
        report["quire_overhead_outside_forward"] = q["overhead_outside_forward"]
    for name in ("hf_generate", "hf_generate_batch"):
        peer = report["results"].get(name, {})
        if q.get("output_tokens_per_s") and peer.get("output_tokens_per_s"):
            report["ratios"][f"quire/{name}"] = {
                "output_tokens_per_s": round(q["output_tokens_per_s"] / peer["output_tokens_per_s"], 3),
                "total_tokens_per_s": round(q["total_tokens_per_s"] / peer["total_tokens_per_s"], 3),
            }

    if args.attention_share and "quire" in peers:
        log("quire: one more run with the attention backend timed ...")
        try:
            report["quire_attention_share"] = peers["quire"].attention_share()
        except Exception as exc:  # noqa: BLE001
            report["quire_attention_share"] = _error(exc)
    if args.profile and "quire" in peers:
        log("quire: profiling one more run under cProfile ...")
        try:
            report["quire_profile"] = peers["quire"].profile(args.profile_top)
        except Exception as exc:  # noqa: BLE001
            report["quire_profile"] = _error(exc)
    if "quire" in peers:
        peers["quire"].close()

    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
