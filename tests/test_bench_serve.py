"""The online serving benchmark (quire.cluster.tools.bench_serve) against a real `quire serve` on loopback.

One small server per module, started with `--api-key secret`: the benchmark runs over HTTP
and gRPC with the right key, and a wrong key must turn into counted failures, not a crash."""
from __future__ import annotations

import argparse
import json
import math
import os

import pytest
from quire.cluster.tools import bench_report, bench_serve
from quire.cluster.cli import build_parser
from serve_process import ServeProcess

API_KEY = "secret"
SERVER_ARGS = ["--max-model-len", "256", "--num-kv-blocks", "64", "--log-level", "warning", "--api-key", API_KEY]
WORKLOAD = ["--num-prompts", "8", "--input-len", "8:16", "--output-len", "4:8", "--seed", "3"]


@pytest.fixture(scope="module")
def server(tokenizer_dir):
    # conftest built the tiny random model into a session temp cache; the server serves it.
    env = {**os.environ, "QUIRE_CACHE_DIR": str(tokenizer_dir.parent), "QUIRE_DEFAULT_MODEL": str(tokenizer_dir)}
    with ServeProcess(SERVER_ARGS, env) as proc:
        yield proc


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_serve.add_bench_args(parser)
    return parser.parse_args(argv)


def target_args(server: ServeProcess, backend: str) -> list[str]:
    if backend == "http":
        return ["--backend", "http", "--base-url", server.http_url]
    return ["--backend", "grpc", "--grpc-target", server.grpc_target]


@pytest.mark.parametrize("backend", ["http", "grpc"])
def test_rate_sweep_measures_every_request(server, backend, tmp_path, capsys):
    out, plots = tmp_path / "report.json", tmp_path / "plots"
    args = parse([*target_args(server, backend), "--api-key", API_KEY, *WORKLOAD, "--request-rates", "inf,20",
                  "--slo-ttft-ms", "60000", "--out", str(out), "--plot-dir", str(plots)])
    report = bench_serve.run_bench(args)

    config = report["config"]
    assert config["model"] == server.model and config["request_rates"] == ["inf", 20.0]
    # HTTP cannot ask the vocabulary; gRPC gets the model's (the default model has 2048 ids).
    assert config["vocab_size"] == (bench_serve.HTTP_VOCAB_FALLBACK if backend == "http" else 2048)
    workload = bench_serve.build_workload(8, (8, 16), (4, 8), config["vocab_size"], 3)
    assert [entry["request_rate"] for entry in report["results"]] == ["inf", 20.0]
    for entry in report["results"]:
        assert entry["completed"] == 8 and entry["failed"] == 0 and entry["errors"] == {}, entry
        assert entry["total_output_tokens"] == entry["expected_output_tokens"] == sum(n for _, n in workload)
        assert entry["total_input_tokens"] == sum(len(prompt) for prompt, _ in workload)
        assert entry["duration_s"] > 0 and entry["output_throughput"] > 0
        assert entry["request_throughput"] == pytest.approx(8 / entry["duration_s"])
        assert entry["goodput"] == pytest.approx(entry["request_throughput"])  # a 60 s TTFT SLO: all meet it
        for name in bench_report.METRICS:
            stats = entry[f"{name}_ms"]
            assert 0 <= stats["median"] <= stats["p90"] <= stats["p99"], (name, stats)
            assert math.isfinite(stats["mean"])
        assert entry["ttft_ms"]["p99"] <= entry["e2e_ms"]["p99"]
        assert entry["ttft_ms"]["mean"] <= entry["e2e_ms"]["mean"]
    assert json.loads(out.read_text()) == report
    for name in ("latency_cdf.png", "rate_sweep.png"):
        assert (plots / name).stat().st_size > 1000
    table = capsys.readouterr().out
    assert "TTFT p99 (ms)" in table and "inf" in table


@pytest.mark.parametrize("backend", ["http", "grpc"])
def test_wrong_api_key_counts_failures(server, backend, tmp_path):
    args = parse([*target_args(server, backend), "--api-key", "wrong", "--num-prompts", "3", "--input-len", "4",
                  "--output-len", "2", "--plot-dir", str(tmp_path)])
    report = bench_serve.run_bench(args)
    (entry,) = report["results"]
    assert entry["completed"] == 0 and entry["failed"] == 3
    (error,) = entry["errors"]
    assert ("401" in error) if backend == "http" else ("UNAUTHENTICATED" in error), error
    assert entry["ttft_ms"]["median"] is None and entry["goodput"] is None
    assert report["config"]["model_lookup_errors"]  # the model could not be asked for either
    assert bench_serve.run_from_args(args) == 1  # nothing completed: a failing exit code
    assert (tmp_path / "latency_cdf.png").stat().st_size > 0


def test_request_timing_counts_tokens_per_chunk(monkeypatch):
    clock = iter([10.0, 10.5, 10.5, 10.8, 11.4, 11.4])
    monkeypatch.setattr(bench_serve.time, "perf_counter", lambda: next(clock))
    timing = bench_serve._Timing()  # sent at 10.0
    timing.chunk(2)  # 10.5: the first token (TTFT) and one more
    timing.chunk(1)  # 10.5
    timing.chunk(3)  # 10.8: three tokens over 0.3 s
    result = timing.result(prompt_tokens=5, output_tokens=None)  # ends at 11.4
    assert result.ok and result.output_tokens == 6 and result.ttft == pytest.approx(0.5)
    assert result.itl == pytest.approx([0.0, 0.1, 0.1, 0.1])
    assert result.e2e == pytest.approx(1.4) and result.tpot == pytest.approx(0.9 / 5)


def test_workload_and_arrivals_are_seeded():
    first = bench_serve.build_workload(50, (2, 9), (1, 4), 100, seed=7)
    assert first == bench_serve.build_workload(50, (2, 9), (1, 4), 100, seed=7)
    assert first != bench_serve.build_workload(50, (2, 9), (1, 4), 100, seed=8)
    assert all(2 <= len(p) <= 9 and 1 <= n <= 4 and all(3 <= t < 100 for t in p) for p, n in first)
    assert bench_serve.arrival_offsets(4, math.inf, 0) == [0.0] * 4
    offsets = bench_serve.arrival_offsets(2000, 10.0, 0)
    assert offsets == bench_serve.arrival_offsets(2000, 10.0, 0) and offsets == sorted(offsets)
    assert offsets[-1] / 1999 == pytest.approx(0.1, rel=0.1)  # mean gap 1/rate


def test_cli_parses_bench_serve():
    args = build_parser().parse_args(["bench", "serve", "--backend", "grpc", "--request-rates", "1,2.5,inf",
                                      "--input-len", "8:16", "--output-len", "5"])
    assert args.func is bench_serve.run_from_args
    assert args.request_rates == [1.0, 2.5, math.inf] and args.input_len == (8, 16) and args.output_len == (5, 5)
    for bad in (["--input-len", "9:3"], ["--request-rates", "0"], ["--request-rate", "fast"]):
        with pytest.raises(SystemExit):
            parse(bad)
