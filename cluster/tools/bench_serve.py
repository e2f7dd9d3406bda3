"""Online serving benchmark: latency and throughput of a running `quire serve`.

    quire bench serve --backend http --base-url http://127.0.0.1:8000 --num-prompts 64 \
        --input-len 32:128 --output-len 32:128 --request-rates 2,8,inf --out serve.json --plot-dir plots

Random token-id prompts (ids in [3, vocab): the low ids are specials) with input and output
lengths drawn uniformly from `--input-len`/`--output-len` with `--seed`; every request is
greedy and ignores EOS, so it produces exactly its drawn length. Arrivals are Poisson at
`--request-rate` per second (seeded by `--seed` and the rate; `inf`: all at once), capped
at `--max-concurrency` in flight if given; `--request-rates 1,2,inf` sweeps the same workload.

Per request: TTFT (sent -> first token-bearing chunk); inter-token latencies (gaps between
token-bearing chunks: a gRPC message of k tokens gives k gaps of gap/k; an SSE chunk's text
does not say how many tokens it holds, so over HTTP each chunk is one gap); TPOT = (E2E -
TTFT) / (output tokens - 1), the tokens from the server's usage; E2E (sent -> end of
stream). A failed request is counted with its error text, never fatal. Per rate: counts,
duration, request/output/total-token throughput, goodput (completed requests per second
meeting every given `--slo-*-ms`; null without SLOs), and mean/median/p90/p99 of each
latency in ms. httpx, grpc, numpy and matplotlib are imported only when used.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quire.cluster.tools.bench_report import (
    format_table,
    plot,
    rate_label,
    rate_text,
    summarize,
)

HTTP_VOCAB_FALLBACK = 1000  # /v1/models does not report the vocabulary; ids below this exist in any real model
FIRST_ID = 3  # ids 0..2 are BOS/EOS/PAD-like specials in the models quire serves


@dataclass
class RequestResult:
    """One request's outcome; times in seconds. `itl` holds one entry per token after the first."""

    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


class _Timing:
    """Turns arrival times of token-bearing chunks into TTFT and inter-token latencies."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.last: float | None = None
        self.ttft: float | None = None
        self.itl: list[float] = []
        self.tokens = 0

    def chunk(self, tokens: int) -> None:
        now = time.perf_counter()
        if self.last is None:
            self.ttft = now - self.start  # the first chunk's extra tokens arrived with the first one
        else:
            self.itl.extend([(now - self.last) / tokens] * tokens)
        self.last, self.tokens = now, self.tokens + tokens

    def result(self, prompt_tokens: int, output_tokens: int | None) -> RequestResult:
        return RequestResult(ok=True, prompt_tokens=prompt_tokens, ttft=self.ttft, itl=self.itl,
                             output_tokens=self.tokens if output_tokens is None else output_tokens,
                             e2e=time.perf_counter() - self.start)


# --- Arguments

def parse_range(text: str) -> tuple[int, int]:
    """'A:B' (or 'A') -> (A, B) with 1 <= A <= B."""
    try:
        lo, _, hi = text.partition(":")
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX, got {text!r}") from None
    if lo < 1 or hi < lo:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


def parse_rate(text: str) -> float:
    """A positive number of requests per second, or 'inf'."""
    try:
        rate = float(text)
    except ValueError:
        rate = math.nan
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"expected a request rate > 0 or 'inf', got {text!r}")
    return rate


def parse_rates(text: str) -> list[float]:
    """'1,2,inf' -> [1.0, 2.0, inf], in the given order."""
    rates = [parse_rate(part.strip()) for part in text.split(",") if part.strip()]
    if not rates:
        raise argparse.ArgumentTypeError(f"expected rates like 1,2,inf, got {text!r}")
    return rates


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options, shared by `quire bench serve` and benchmarks/serving.py."""
    target = parser.add_argument_group("target")
    target.add_argument("--backend", choices=["http", "grpc"], default="http")
    target.add_argument("--base-url", default="http://127.0.0.1:8000", help="the HTTP server (backend http)")
    target.add_argument("--grpc-target", default=None,
                        help="HOST:PORT of quire.v1.Generate (backend grpc; default 127.0.0.1:50051); "
                             "with backend http, only asked for the vocabulary")
    target.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer KEY`")
    target.add_argument("--model", default=None, help="default: the served one (/v1/models or GetModelInfo)")
    target.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take in all")
    load = parser.add_argument_group("workload")
    load.add_argument("--num-prompts", type=int, default=64)
    load.add_argument("--input-len", type=parse_range, default=(32, 128), help="prompt tokens, MIN:MAX")
    load.add_argument("--output-len", type=parse_range, default=(32, 128), help="output tokens, MIN:MAX")
    load.add_argument("--vocab-size", type=int, default=None,
                      help=f"prompt ids are drawn from [{FIRST_ID}, this); default: GetModelInfo's when a "
                           f"gRPC target is given, else {HTTP_VOCAB_FALLBACK}")
    load.add_argument("--request-rate", type=parse_rate, default=math.inf,
                      help="requests per second (Poisson arrivals); inf: all at once")
    load.add_argument("--request-rates", type=parse_rates, default=None,
                      help="a sweep, e.g. 1,2,inf: the same workload at each rate in turn")
    load.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    load.add_argument("--seed", type=int, default=0)
    slo = parser.add_argument_group("goodput SLOs (a request counts toward goodput if it meets every one given)")
    slo.add_argument("--slo-ttft-ms", type=float, default=None)
    slo.add_argument("--slo-tpot-ms", type=float, default=None)
    slo.add_argument("--slo-e2e-ms", type=float, default=None)
    out = parser.add_argument_group("output")
    out.add_argument("--out", default=None, help="write the JSON report here")
    out.add_argument("--plot-dir", default=None, help="write latency_cdf.png (and rate_sweep.png) here")


def build_workload(num_prompts: int, input_len: tuple[int, int], output_len: tuple[int, int],
                   vocab_size: int, seed: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) per request; the same for the same arguments."""
    if vocab_size <= FIRST_ID:
        raise ValueError(f"`--vocab-size` must be above {FIRST_ID} (got {vocab_size})")
    rng = random.Random(seed)
    workload = []
    for _ in range(num_prompts):
        n_in, n_out = rng.randint(*input_len), rng.randint(*output_len)
        workload.append(([rng.randrange(FIRST_ID, vocab_size) for _ in range(n_in)], n_out))
    return workload


def arrival_offsets(count: int, rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each request is sent: a Poisson process of `rate`/s."""
    if math.isinf(rate):
        return [0.0] * count
    rng = random.Random(f"{seed}:{rate}")  # the same arrivals for a rate wherever it sits in a sweep
    offsets, now = [], 0.0
    for _ in range(count):
        offsets.append(now)
        now += rng.expovariate(rate)
    return offsets


# --- Clients: each turns one (prompt, output length) into a RequestResult, never raising

def _error_text(status: int, body: bytes) -> str:
    try:
        return f"HTTP {status}: {json.loads(body)['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {body[:200].decode(errors='replace')}"


async def http_request(client: Any, model: str | None, prompt: list[int], output_len: int) -> RequestResult:
    """One streamed `POST /v1/completions`; `client` is an httpx.AsyncClient on the server."""
    body = {"prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    timing, usage = _Timing(), None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return RequestResult(error=_error_text(response.status_code, await response.aread()))
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators and SSE comments
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return RequestResult(error=f"stream error: {chunk['error'].get('message', chunk['error'])}")
            usage = chunk.get("usage") or usage
            # quire sends the last token together with finish_reason, possibly with no text (a special token).
            if any(choice.get("text") or choice.get("finish_reason") for choice in chunk.get("choices") or []):
                timing.chunk(1)
    if usage is None:
        return timing.result(len(prompt), None)
    return timing.result(usage["prompt_tokens"], usage["completion_tokens"])


async def grpc_request(stub: Any, model: str | None, prompt: list[int], output_len: int,
                       metadata: tuple, timeout: float) -> RequestResult:
    """One server-streaming `quire.v1.Generate/Generate`; `stub` is a GenerateStub on a grpc.aio channel."""
    from quire.protos import generate_pb2 as pb

    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), model=model or "",
                                 sampling=pb.SamplingOptions(max_tokens=output_len, temperature=0.0, ignore_eos=True))
    timing, usage = _Timing(), None
    async for message in stub.Generate(request, metadata=metadata, timeout=timeout):
        if message.token_ids:
            timing.chunk(len(message.token_ids))
        if message.HasField("usage"):
            usage = message.usage
    if usage is None:
        return timing.result(len(prompt), None)
    return timing.result(usage.prompt_tokens, usage.completion_tokens)


async def _guarded(call: Awaitable[RequestResult], timeout: float) -> RequestResult:
    """`call`'s result, or a failed result with the error text: one request never ends the run."""
    try:
        return await asyncio.wait_for(call, timeout)
    except asyncio.TimeoutError:
        return RequestResult(error=f"timeout after {timeout:g}s")
    except Exception as exc:  # noqa: BLE001 - a connection error, a bad chunk, a gRPC status: counted, not fatal
        code = getattr(exc, "code", None)
        if callable(code) and callable(getattr(exc, "details", None)):  # grpc.aio.AioRpcError
            return RequestResult(error=f"gRPC {code().name}: {exc.details()}")
        return RequestResult(error=f"{type(exc).__name__}: {exc}")


# --- Running and reporting

async def run_rate(send: Callable[[list[int], int], Awaitable[RequestResult]], workload: list[tuple[list[int], int]],
                   rate: float, seed: int, max_concurrency: int | None) -> tuple[list[RequestResult], float]:
    """Send the workload at `rate`; every request's result (in workload order) and the duration."""
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    start = time.perf_counter()

    async def one(offset: float, prompt: list[int], output_len: int) -> RequestResult:
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        if limit is None:
            return await send(prompt, output_len)
        async with limit:
            return await send(prompt, output_len)

    offsets = arrival_offsets(len(workload), rate, seed)
    results = await asyncio.gather(*(one(o, p, n) for o, (p, n) in zip(offsets, workload)))
    return list(results), time.perf_counter() - start


async def _bench(args: argparse.Namespace) -> tuple[dict[str, Any], list[tuple[float, list[RequestResult]]]]:
    rates = args.request_rates or [args.request_rate]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    metadata = (("authorization", f"Bearer {args.api_key}"),) if args.api_key else ()
    grpc_target = args.grpc_target or ("127.0.0.1:50051" if args.backend == "grpc" else None)
    model, vocab, lookup_errors = args.model, args.vocab_size, []
    channel = client = None
    try:
        if grpc_target:
            import grpc
            from quire.protos import generate_pb2, generate_pb2_grpc

            channel = grpc.aio.insecure_channel(grpc_target)
            stub = generate_pb2_grpc.GenerateStub(channel)
            if model is None or vocab is None:
                try:
                    info = await stub.GetModelInfo(generate_pb2.GetModelInfoRequest(), metadata=metadata,
                                                   timeout=min(args.timeout, 30.0))
                    model = model or (info.model if args.backend == "grpc" else None)
                    vocab = vocab or info.vocab_size
                except grpc.aio.AioRpcError as exc:  # the requests will fail and say why; the run goes on
                    lookup_errors.append(f"GetModelInfo: {exc.code().name}: {exc.details()}")
        if args.backend == "http":
            import httpx

            # One connection per concurrent stream: no pool limit unless the benchmark sets one.
            limits = httpx.Limits(max_connections=args.max_concurrency, max_keepalive_connections=None)
            client = httpx.AsyncClient(base_url=args.base_url, headers=headers, limits=limits,
                                       timeout=httpx.Timeout(args.timeout))
            if model is None:
                try:
                    response = await client.get("/v1/models")
                    response.raise_for_status()
                    model = response.json()["data"][0]["id"]
                except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
                    lookup_errors.append(f"/v1/models: {type(exc).__name__}: {exc}")

            def send(prompt: list[int], output_len: int) -> Awaitable[RequestResult]:
                return _guarded(http_request(client, model, prompt, output_len), args.timeout)
        else:
            def send(prompt: list[int], output_len: int) -> Awaitable[RequestResult]:
                return _guarded(grpc_request(stub, model, prompt, output_len, metadata, args.timeout), args.timeout)

        vocab = vocab or HTTP_VOCAB_FALLBACK
        workload = build_workload(args.num_prompts, args.input_len, args.output_len, vocab, args.seed)
        expected = sum(n for _, n in workload)
        slo_ms = {name: value for name, value in (("ttft", args.slo_ttft_ms), ("tpot", args.slo_tpot_ms),
                                                  ("e2e", args.slo_e2e_ms)) if value is not None}
        runs, entries = [], []
        for rate in rates:
            print(f"bench: {len(workload)} requests at {rate_text(rate)} req/s ...", file=sys.stderr, flush=True)
            results, duration = await run_rate(send, workload, rate, args.seed, args.max_concurrency)
            runs.append((rate, results))
            entries.append({"request_rate": rate_label(rate), **summarize(results, duration, expected, slo_ms)})
    finally:
        if client is not None:
            await client.aclose()
        if channel is not None:
            await channel.close()
    config = {"backend": args.backend, "target": args.base_url if args.backend == "http" else grpc_target,
              "model": model, "num_prompts": args.num_prompts, "input_len": list(args.input_len),
              "output_len": list(args.output_len), "vocab_size": vocab, "seed": args.seed,
              "request_rates": [rate_label(r) for r in rates], "max_concurrency": args.max_concurrency,
              "timeout_s": args.timeout, "slo_ms": slo_ms, "model_lookup_errors": lookup_errors}
    return {"config": config, "results": entries}, runs


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark `args` describe (see add_bench_args); print the table, write `--out`
    and the plots when asked, and return the report. Failed requests are counted, not raised."""
    report, runs = asyncio.run(_bench(args))
    print(format_table(report), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot_dir:
        plot(runs, report, Path(args.plot_dir))
    return report


def run_from_args(args: argparse.Namespace) -> int:
    """run_bench, as an exit code: 1 when no request at all completed, else 0."""
    report = run_bench(args)
    return 0 if any(entry["completed"] for entry in report["results"]) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_bench_args(parser)
    return run_from_args(parser.parse_args(argv))
