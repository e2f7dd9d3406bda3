"""The `quire` command line (quire.cluster.cli): `generate` and `serve` run as subprocesses,
through the installed console script when there is one."""
from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from quire.cluster.cli import build_parser, main, parse_bytes
from quire.cluster.core.config import EngineConfig

SMALL = ["--num-kv-blocks", "16", "--max-model-len", "64"]


def quire_command() -> list[str]:
    script = Path(sys.executable).with_name("quire")
    # (Not `python -m`: from the checkout's root its folders would shadow installed packages.)
    run_cli = "import sys; del sys.path[0]; from quire.cluster.cli import main; sys.exit(main())"
    return [str(script)] if script.is_file() else [sys.executable, "-c", run_cli]


@pytest.fixture(scope="module")
def cache_env(tokenizer_dir):
    # conftest built the tiny random model into a session temp cache; serve it, not the shipped one.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUIRE_CACHE_DIR", str(tokenizer_dir.parent))
        mp.setenv("QUIRE_DEFAULT_MODEL", str(tokenizer_dir))  # the tiny random model, not the shipped one
        yield {**os.environ}


def test_generate_prints_completions(cache_env):
    result = subprocess.run(
        [*quire_command(), "generate", "--prompt", "Hello world", "--prompt", "The cat", "--max-tokens", "5",
         "--ignore-eos", "--json", *SMALL], env=cache_env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["prompt"] for line in lines] == ["Hello world", "The cat"]
    for line in lines:
        assert len(line["token_ids"]) == 5 and line["finish_reason"] == "length" and line["text"]


def test_generate_bad_input_is_a_clean_error(cache_env, capsys):
    assert main(["generate", "--prompt", "", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "quire: error:" in err and "`prompt`" in err and "Traceback" not in err


def test_serve_port_zero_announces_bound_port(cache_env):
    # Ctrl-C as a terminal delivers it: a shell's background job (CI's, say) starts with SIGINT
    # ignored, which the server would inherit and then never exit 130 on it.
    proc = subprocess.Popen([*quire_command(), "serve", "--port", "0", "--grpc-port", "-1", "--log-level", "warning",
                             *SMALL],
                            env=cache_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        deadline, match, seen = time.monotonic() + 60, None, []
        while match is None:
            try:
                seen.append(lines.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                pytest.fail(f"no serving line within 60s; output: {''.join(seen)}")
            match = re.match(r"quire: serving (\S+) on (http://127\.0\.0\.1:(\d+))$", seen[-1].strip())
        model, url, port = match.groups()
        assert model == "tiny-random-llama-v1" and int(port) > 0
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/health").status_code == 200
            body = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "ignore_eos": True}).json()
            assert body["usage"]["completion_tokens"] == 3
        # Ctrl-C: uvicorn shuts down gracefully, then re-raises the signal; 130 is the shell's code for it.
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 130
        time.sleep(0.1)  # let the reader thread drain the pipe
        rest = "".join(lines.get_nowait() for _ in range(lines.qsize()))
        assert "Traceback" not in rest, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_parse_bytes_and_serve_arguments():
    assert parse_bytes("1GiB") == 1 << 30 and parse_bytes("512MiB") == 512 << 20
    assert parse_bytes("1.5GB") == 1_500_000_000 and parse_bytes("4096") == 4096
    with pytest.raises(Exception):
        parse_bytes("lots")
    args = build_parser().parse_args(["serve", "--port", "0", "--kv-cache-memory", "64MiB", "--max-num-seqs", "4"])
    assert (args.host, args.port, args.kv_cache_memory, args.max_num_seqs) == ("127.0.0.1", 0, 64 << 20, 4)
    assert args.block_size == 16 and args.max_num_batched_tokens is None
    args = build_parser().parse_args([
        "serve", "--host", "0.0.0.0", "--port", "8080", "--grpc-port", "9090", "--api-key", "k",
        "--tensor-parallel-size", "4", "--max-num-seqs", "8", "--max-num-batched-tokens", "512", "--block-size", "32",
        "--max-model-len", "4096", "--gpu-memory-utilization", "0.85", "--max-queue-len", "100",
        "--ssl-certfile", "c.pem", "--ssl-keyfile", "k.pem"])
    assert (args.grpc_port, args.api_key, args.tensor_parallel_size, args.max_queue_len) == (9090, "k", 4, 100)
    assert (args.gpu_memory_utilization, args.ssl_certfile, args.ssl_keyfile) == (0.85, "c.pem", "k.pem")


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_kv_cache_flags_parse_into_engine_arguments(command):
    from quire.cluster.cli import _engine_kwargs

    args = build_parser().parse_args([command, "--kv-cache-dtype", "int8", "--kv-host-memory", "2GiB"])
    assert (args.kv_cache_dtype, args.kv_host_memory) == ("int8", 2 << 30)
    kwargs = _engine_kwargs(args)
    assert kwargs["kv_cache_dtype"] == "int8" and kwargs["kv_host_memory"] == 2 << 30
    config = EngineConfig.from_kwargs(**kwargs)
    assert (config.cache.kv_cache_dtype, config.cache.kv_host_memory) == ("int8", 2 << 30)
    unset = _engine_kwargs(build_parser().parse_args([command]))  # the config's defaults apply
    assert "kv_cache_dtype" not in unset and "kv_host_memory" not in unset
    assert build_parser().parse_args([command, "--kv-cache-dtype", "fp8_e4m3"]).kv_cache_dtype == "fp8_e4m3"


@pytest.mark.parametrize("argv", [["--kv-cache-dtype", "fp8"], ["--kv-cache-dtype", "bf16"],
                                  ["--kv-host-memory", "lots"], ["--kv-host-memory", "0"]])
def test_a_bad_kv_cache_flag_is_a_usage_error_naming_it(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", *argv])
    assert exited.value.code == 2 and argv[0] in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, field", [
    (dict(kv_cache_dtype="fp8"), "kv_cache_dtype"), (dict(kv_cache_dtype="bfloat16"), "kv_cache_dtype"),
    (dict(kv_host_memory=-1), "kv_host_memory"), (dict(kv_host_memory=1.5), "kv_host_memory"),
    (dict(kv_host_memory=True), "kv_host_memory"), (dict(kv_host_memory="1GiB"), "kv_host_memory")])
def test_the_engine_config_names_a_bad_kv_cache_field(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        EngineConfig.from_kwargs(**kwargs)


def test_the_kv_cache_config_defaults():
    cache = EngineConfig.from_kwargs().cache
    assert (cache.kv_cache_dtype, cache.kv_host_memory) == ("auto", 0)


def test_worker_arguments_pass_through_unparsed():
    argv = ["--rank", "1", "--world-size", "2", "--help", "--log-level", "debug", "--", "-x"]
    assert build_parser().parse_args(["worker", *argv]).worker_args == argv


def test_worker_help_is_the_workers_own():
    # `quire worker` execs `python -m quire.worker.server`, so this is the worker's parser speaking.
    result = subprocess.run([*quire_command(), "worker", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: quire worker")
    for option in ("--rank", "--world-size", "--listen", "--dist-init", "--cpu-cores", "--log-level"):
        assert option in result.stdout
    result = subprocess.run([*quire_command(), "worker", "--rank", "0"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "quire worker: error:" in result.stderr and "--world-size" in result.stderr


def test_a_reader_that_goes_away_is_not_an_error():
    """`quire plan ... | head`: the plan meets a pipe its reader closed (here `true`, which closes
    it before quire has started); quire stops quietly, exit status 0."""
    import shutil

    quire = shutil.which("quire", path=os.path.dirname(sys.executable))
    result = subprocess.run(["bash", "-c", f"set -o pipefail; '{quire}' plan --model llama-3-70b | true"],
                            capture_output=True, text=True, timeout=120)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
    assert result.returncode == 0
