"""The `quire` command line.

    quire serve [--model PATH] [--host 127.0.0.1] [--port 8000] [--grpc-port 50051] ...
                                                                      OpenAI-compatible HTTP + gRPC server
    quire generate --prompt TEXT [--prompt TEXT ...] [--max-tokens 32] offline generation
                   (or --prompt-token-ids 1,15,27: with --skip-tokenizer-init, the only kind)
    quire plan --model llama-3-70b -tp 4 --gpu a100-80gb                will it fit, how many at once
    quire worker --rank 0 --world-size 2 [--listen HOST:PORT] ...       one rank, for --executor workers
    quire bench serve [--base-url URL] [--request-rates 1,inf] ...      benchmark a running server

Without `--model` quire's shipped default model is used (a small Llama trained on the Python
standard library, in the package; $QUIRE_DEFAULT_MODEL names another directory). `serve`
prints `quire: serving MODEL on http://HOST:PORT` once the socket is bound (the real port
when `--port 0`).

Only `serve` and `generate` load the engine; `plan`, `bench` and `--help` import neither torch
nor the worker, and `worker` hands over to `python -m quire.worker.server` (the controller
never imports the worker: tests/test_import_rules.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from typing import NoReturn

from quire.cluster.core.config import KV_CACHE_DTYPES
from quire.cluster.tools.default_model import DefaultModelMissing

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'1073741824', '1GiB', '512MiB', '1.5GB' → bytes. argparse turns ValueError into a usage error."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 1073741824, 512MiB, 1GiB)")
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least one byte")
    return value


def parse_token_ids(text: str) -> list[int]:
    """'1,15,27' → [1, 15, 27] (argparse reports the ArgumentTypeError as a usage error)."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of token ids") from None


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--model", default=None, help="checkpoint directory (default: the embedded tiny model)")
    group.add_argument("--tokenizer", default=None, metavar="PATH",
                       help="tokenizer directory, for a checkpoint without tokenizer files (default: the model's)")
    group.add_argument("--skip-tokenizer-init", action="store_true", default=None,
                       help="load no tokenizer: prompts must be token ids, outputs carry token ids and no text "
                            "(no chat, no stop strings)")
    group.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    group.add_argument("--max-num-seqs", type=int, default=None, help="cap on concurrently running requests")
    group.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget of one step")
    group.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    group.add_argument("--num-kv-blocks", type=int, default=None, help="KV blocks (default: sized from memory)")
    group.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                       help="KV-cache bytes per rank on the CPU, e.g. 1GiB (default: 512MiB)")
    group.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                       help="share the KV blocks of common prompt prefixes (default: on)")
    group.add_argument("--preemption-mode", default=None, choices=["recompute", "swap"],
                       help="when KV blocks run out: free a request's blocks (recompute, default) or move them "
                            "to the workers' CPU swap pool")
    group.add_argument("--swap-space", type=parse_bytes, default=None,
                       help="CPU swap pool per rank for --preemption-mode swap, e.g. 4GiB (default: 1GiB)")
    group.add_argument("--kv-cache-dtype", default=None, choices=KV_CACHE_DTYPES,
                       help="KV cache format: auto (the model's dtype, default), or int8 / fp8_e4m3: one-byte "
                            "codes with a float16 scale per token and KV head, about twice bf16's tokens")
    group.add_argument("--kv-host-memory", type=parse_bytes, default=None, metavar="BYTES",
                       help="host memory per rank for the prefix cache's host tier, e.g. 8GiB (default: none); "
                            "the workers allocate it with --swap-space as one host pool")
    group.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                       help="plan each step while the one before runs (default: on where the workers are "
                            "separate processes, off in-process)")
    group.add_argument("--admission-watermark", type=float, default=None,
                       help="share of KV blocks a new request must leave free while others run (default 0.01)")
    group.add_argument("--gpu-memory-utilization", type=float, default=None,
                       help="share of each GPU's memory quire may use (weights, activations, KV cache)")
    group.add_argument("--enforce-eager", action="store_true", default=None,
                       help="run every step eagerly: no CUDA graphs for decode steps (default: graphs on CUDA)")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    group.add_argument("--seed", type=int, default=0, help="random seed of the workers (sampling)")
    group.add_argument("--tensor-parallel-size", "-tp", type=int, default=None, help="GPUs (ranks) per model")
    group.add_argument("--executor", default=None, choices=["auto", "inproc", "ray", "workers"],
                       help="auto: in-process for one rank, Ray for more")
    group.add_argument("--worker-addresses", default=None, type=lambda text: text.split(","),
                       help="HOST:PORT,... of workers started with `quire worker` (rank order)")
    group.add_argument("--dist-init-method", default=None, help="torch.distributed URL those workers share")
    group.add_argument("--max-worker-restarts", type=int, default=None,
                       help="after a worker dies, start fresh workers and replay every request, at most this "
                            "many times (default 2; 0 fails the requests instead)")
    group.add_argument("--bind-cpu-cores", action=argparse.BooleanOptionalAction, default=None,
                       help="pin CPU workers started here to cores of their own, one left to the controller "
                            "(default: on)")
    group.add_argument("--ray-address", default=None, help="join this Ray cluster (default: $RAY_ADDRESS or a new one)")
    group.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error", "critical"])


def _engine_kwargs(args: argparse.Namespace) -> dict:
    # Unset options are left out so EngineConfig's own defaults apply.
    names = ("model", "tokenizer", "skip_tokenizer_init", "block_size", "max_num_seqs", "max_num_batched_tokens",
             "max_model_len", "num_kv_blocks", "kv_cache_memory", "gpu_memory_utilization", "enable_prefix_caching",
             "preemption_mode", "swap_space", "dtype", "seed", "tensor_parallel_size", "executor", "worker_addresses",
             "dist_init_method", "ray_address", "max_worker_restarts", "async_scheduling",
             "bind_cpu_cores", "admission_watermark", "enforce_eager", "kv_cache_dtype", "kv_host_memory")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _serve(args: argparse.Namespace) -> int:
    from quire.cluster.serving.serve import run_server

    return run_server(args, _engine_kwargs(args))


GPUS = {  # device memory and HBM bandwidth of common cards (SXM variants)
    "a100-40gb": (40 << 30, 1.555e12), "a100-80gb": (80 << 30, 2.039e12), "h100-80gb": (80 << 30, 3.35e12),
    "h200": (141 * 10**9, 4.8e12), "l40s": (48 << 30, 0.864e12),
}


def parse_bandwidth(text: str) -> float:
    """'2039GB/s', '2.039TB/s', '2.039e12' → bytes per second."""
    value = text.strip()
    value = value[:-2] if value.lower().endswith("/s") else value
    return float(parse_bytes(value))


def _plan(args: argparse.Namespace) -> int:
    from quire.cluster.tools.planner import ModelShape, format_plan, make_plan

    memory, bandwidth = GPUS[args.gpu] if args.gpu else (None, None)
    plan = make_plan(
        ModelShape.load(args.model), tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype, block_size=args.block_size, max_model_len=args.max_model_len,
        gpu_memory=args.gpu_memory or memory, gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory=args.kv_cache_memory, max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs, prompt_len=args.prompt_len, output_len=args.output_len,
        hbm_bandwidth=args.hbm_bandwidth or bandwidth, data_parallel_size=args.data_parallel_size,
        kv_host_memory=args.kv_host_memory)
    print(plan.to_json() if args.json else format_plan(plan))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from quire.cluster.serving.llm import LLM
    from quire.protos.step import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, stop=args.stop or [], ignore_eos=args.ignore_eos)
    prompts = [*(args.prompt or []), *(args.prompt_token_ids or [])]
    if not prompts:
        raise ValueError("`prompt`: give --prompt TEXT or --prompt-token-ids IDS")
    kwargs = _engine_kwargs(args)
    llm = LLM(**kwargs)
    has_text = llm.get_tokenizer() is not None
    try:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.shutdown()
    for prompt, output in zip(prompts, outputs):
        completion = output.outputs[0]
        if args.json:
            print(json.dumps({"prompt": prompt, "text": completion.text, "token_ids": list(completion.token_ids),
                              "finish_reason": completion.finish_reason}), flush=True)
        else:
            shown = repr(completion.text) if has_text else f"token ids {list(completion.token_ids)}"
            print(f"Prompt: {prompt!r}\nCompletion: {shown} "
                  f"({len(completion.token_ids)} tokens, finish_reason={completion.finish_reason})", flush=True)
    return 0


def _worker(args: argparse.Namespace) -> NoReturn:
    """Become the worker process `LocalWorkerLauncher` starts (`quire.worker.server ARGS`).
    Exec, not import: the worker pulls in torch, and the controller stays free of it."""
    from quire.cluster.executor.local_launcher import worker_command

    sys.stdout.flush()
    sys.stderr.flush()
    command = worker_command(*args.worker_args)
    os.execv(command[0], command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quire", description="quire: a paged-attention LLM serving engine")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from quire.cluster.serving.serve import add_serve_args

    serve = commands.add_parser("serve", help="run the OpenAI-compatible HTTP and the gRPC server")
    add_serve_args(serve)
    _add_engine_args(serve)
    serve.set_defaults(func=_serve, default_log_level="info")

    generate = commands.add_parser("generate", help="generate completions offline and print them")
    generate.add_argument("--prompt", action="append", default=None, help="a prompt; repeat for several")
    generate.add_argument("--prompt-token-ids", action="append", default=None, type=parse_token_ids, metavar="IDS",
                          help="a prompt as comma-separated token ids (e.g. 1,15,27); repeat for several")
    generate.add_argument("--max-tokens", type=int, default=32)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--stop", action="append", default=None, help="a stop string; repeat for several")
    generate.add_argument("--ignore-eos", action="store_true")
    generate.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    _add_engine_args(generate)
    generate.set_defaults(func=_generate, default_log_level="warning")

    plan = commands.add_parser("plan", help="how a model fits on given GPUs, before renting them (no weights read)")
    plan.add_argument("--model", required=True,
                      help="a checkpoint directory, its config.json, or a preset: llama-3-8b, llama-3-70b")
    plan.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    plan.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                      help="replicas behind one router, as `quire serve -dp`: adds per-replica and total capacity")
    plan.add_argument("--gpu", choices=sorted(GPUS), default=None, help="a card's memory and HBM bandwidth")
    plan.add_argument("--gpu-memory", type=parse_bytes, default=None, help="device memory per GPU, e.g. 80GiB")
    plan.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    plan.add_argument("--hbm-bandwidth", type=parse_bandwidth, default=None, help="e.g. 2039GB/s")
    plan.add_argument("--kv-cache-memory", type=parse_bytes, default=512 << 20,
                      help="KV budget per rank when planning for the CPU (no --gpu/--gpu-memory)")
    plan.add_argument("--dtype", default="auto", help="weights: auto (the checkpoint's), bf16, fp16, fp32")
    plan.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                      help="as `quire serve`: auto (= dtype), int8, fp8_e4m3 (codes + a scale per token and head)")
    plan.add_argument("--kv-host-memory", type=parse_bytes, default=0, metavar="BYTES",
                      help="host memory per rank of the prefix cache's host tier: the plan reports its tokens")
    plan.add_argument("--block-size", type=int, default=16)
    plan.add_argument("--max-model-len", type=int, default=None)
    plan.add_argument("--max-num-batched-tokens", type=int, default=2048)
    plan.add_argument("--max-num-seqs", type=int, default=256)
    plan.add_argument("--prompt-len", type=int, default=1024)
    plan.add_argument("--output-len", type=int, default=256)
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=_plan, log_level=None, default_log_level="warning")

    # Every argument (--help and --log-level too) goes unparsed to the worker's own parser: no
    # option is known here ("\0" never starts an argument), so REMAINDER takes them all.
    worker = commands.add_parser("worker", help="run one tensor-parallel worker (gRPC) for a controller",
                                 add_help=False, prefix_chars="\0")
    worker.add_argument("worker_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    worker.set_defaults(func=_worker, log_level=None, default_log_level="warning")

    from quire.cluster.tools import bench_serve

    bench = commands.add_parser("bench", help="benchmarks against a running server")
    benchmarks = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    bench_serve_parser = benchmarks.add_parser("serve", help="online serving benchmark (latency, throughput, goodput)")
    bench_serve.add_bench_args(bench_serve_parser)
    # No --log-level here: the benchmark is a client, and httpx logs every request at info.
    bench_serve_parser.set_defaults(func=bench_serve.run_from_args, log_level=None, default_log_level="warning")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.log_level = args.log_level or args.default_log_level
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, DefaultModelMissing) as exc:  # bad configuration: say what, not a traceback
        print(f"quire: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`quire plan ... | head`): nothing more to say. Point stdout at
        # /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
