"""What guards a `quire serve`: API keys on both frontends (health and metrics stay open),
TLS on both, and a bounded queue that refuses at once rather than letting anyone hang."""
from __future__ import annotations

import contextlib
import os
import time

import grpc
import httpx
import openai
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from quire.protos import generate_pb2 as pb
from quire.protos import generate_pb2_grpc
from serve_process import ServeProcess

SMALL = ["--max-model-len", "128", "--num-kv-blocks", "64", "--log-level", "warning"]
GREEDY = pb.SamplingOptions(max_tokens=3, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def env(tokenizer_dir):
    return {**os.environ, "QUIRE_CACHE_DIR": str(tokenizer_dir.parent), "QUIRE_DEFAULT_MODEL": str(tokenizer_dir)}


@pytest.fixture(scope="module")
def secured(env, tmp_path_factory):
    """A server with --api-key and TLS; yields (process, CA certificate PEM path)."""
    directory = tmp_path_factory.mktemp("tls")
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1", "localhost")
    key, chain, ca = directory / "key.pem", directory / "chain.pem", directory / "ca.pem"
    certificate.private_key_pem.write_to_path(str(key))
    certificate.cert_chain_pems[0].write_to_path(str(chain))
    authority.cert_pem.write_to_path(str(ca))
    args = ["--api-key", "secret", "--ssl-keyfile", str(key), "--ssl-certfile", str(chain), *SMALL]
    with ServeProcess(args, env) as process:
        yield process, ca


def test_https_needs_the_key_except_for_health_and_metrics(secured):
    server, ca = secured
    assert server.http_url.startswith("https://")
    with httpx.Client(base_url=server.http_url, verify=str(ca), timeout=30) as http:
        body = {"prompt": "Hi", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret"}):
            response = http.post("/v1/completions", json=body, headers=headers)
            assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
        assert http.get("/v1/models").status_code == 401
        assert http.get("/health").status_code == 200 and http.get("/metrics").status_code == 200
    with pytest.raises(httpx.ConnectError):  # a client that does not trust the certificate refuses to talk
        httpx.get(f"{server.http_url}/health", timeout=10)
    good = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="secret", max_retries=0,
                         http_client=httpx.Client(verify=str(ca), timeout=30))
    assert good.completions.create(model=server.model, prompt="Hi", max_tokens=2).usage.completion_tokens == 2
    bad = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="wrong", max_retries=0,
                        http_client=httpx.Client(verify=str(ca), timeout=30))
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Hi"}])


def test_grpc_over_tls_needs_the_key_except_for_health(secured):
    server, ca = secured
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    with grpc.secure_channel(server.grpc_target, credentials) as channel:
        stub = generate_pb2_grpc.GenerateStub(channel)
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Generate(pb.GenerateRequest(text="Hi", sampling=GREEDY), metadata=metadata, timeout=10))
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as caught:
                stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=metadata, timeout=10)
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        key = (("authorization", "Bearer secret"),)
        messages = list(stub.Generate(pb.GenerateRequest(text="Hi", sampling=GREEDY), metadata=key, timeout=30))
        assert messages[-1].usage.completion_tokens == 3
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(server.grpc_target) as plaintext:  # TLS is not optional
        with pytest.raises(grpc.RpcError):
            generate_pb2_grpc.GenerateStub(plaintext).GetServerInfo(pb.GetServerInfoRequest(), timeout=5)


def test_full_queue_is_refused_at_once_on_both_frontends(env):
    # Long enough (1000 steps) that the running request outlives the whole test on any machine.
    long = pb.SamplingOptions(max_tokens=1000, temperature=0, ignore_eos=True)
    args = ["--max-num-seqs", "1", "--max-queue-len", "2", "--max-model-len", "1024", "--num-kv-blocks", "64",
            "--log-level", "warning"]
    with ServeProcess(args, env) as server, grpc.insecure_channel(server.grpc_target) as channel:
        stub = generate_pb2_grpc.GenerateStub(channel)
        calls = []
        for index in range(3):  # one runs, two wait: the queue is full
            calls.append(stub.Generate(pb.GenerateRequest(request_id=f"r{index}", text="Hi", sampling=long),
                                       timeout=60))
            expected = (1, index) if index else (1, 0)
            deadline = time.monotonic() + 20
            while (info := stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=5)) and \
                    (info.num_running, info.num_waiting) != expected:
                assert time.monotonic() < deadline, f"queue never reached {expected}: {info}"
                time.sleep(0.02)
        assert info.max_queue_len == 2
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(pb.GenerateRequest(text="Hi", sampling=GREEDY), timeout=30))
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queue_len" in caught.value.details()
        response = httpx.post(f"{server.http_url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
        assert response.status_code == 429 and response.json()["error"]["code"] == "queue_full"
        assert time.monotonic() - started < 5, "a refusal must not wait for the queue"
        for call in calls:
            call.cancel()
        metrics = httpx.get(f"{server.http_url}/metrics", timeout=10).text
        assert 'quire_requests_rejected_total{model_name="tiny-random-llama-v1",reason="queue_full"} 2.0' in metrics


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):  # the process ended meanwhile
                pass
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the worker process through /proc")
def test_an_engine_whose_worker_died_for_good_says_why_and_exits(env):
    """With no restart left, a dead worker stops the engine: both health checks turn down (HTTP
    with the reason), and `quire serve` exits with status 1 for its supervisor to restart it
    rather than answering 503 forever."""
    args = ["--executor", "workers", "--tensor-parallel-size", "1", "--max-worker-restarts", "0", *SMALL]
    with ServeProcess(args, env) as server, grpc.insecure_channel(server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="quire.v1.Generate")
        assert health.Check(request, timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        (worker,) = _children(server.proc.pid)
        os.kill(worker, 9)
        deadline = time.monotonic() + 30
        while server.proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(grpc.RpcError, httpx.TransportError):  # refused once it closes
                health.Check(request, timeout=5)  # SERVING or NOT_SERVING: it answers while it can
                answer = httpx.get(f"{server.http_url}/health", timeout=5)
                assert answer.status_code == 200 or "rank 0" in answer.json()["reason"], answer.text
            time.sleep(0.02)
        assert server.proc.wait(timeout=30) == 1, server.output()
        assert "quire: the engine stopped" in server.output() and "rank 0" in server.output()


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the worker process through /proc")
def test_a_stream_outlives_its_worker(env):
    """A worker killed mid-stream is replaced and the request replayed from its tokens: the
    client sees every token, once, and the server is healthy again."""
    args = ["--executor", "workers", "--tensor-parallel-size", "1", "--max-model-len", "512", "--num-kv-blocks", "64",
            "--log-level", "warning"]
    options = pb.SamplingOptions(max_tokens=300, temperature=0, ignore_eos=True)
    with ServeProcess(args, env) as server, grpc.insecure_channel(server.grpc_target) as channel:
        stub = generate_pb2_grpc.GenerateStub(channel)
        reference = [t for m in stub.Generate(pb.GenerateRequest(text="Hi", sampling=options), timeout=120)
                     for t in m.token_ids]
        (worker,) = _children(server.proc.pid)
        call = stub.Generate(pb.GenerateRequest(text="Hi", sampling=options), timeout=120)
        tokens = list(next(call).token_ids)
        os.kill(worker, 9)
        for message in call:
            tokens.extend(message.token_ids)
        assert tokens == reference, "the replayed request continues exactly where it was"
        assert message.finish_reason == "length" and message.usage.completion_tokens == 300
        (replacement,) = _children(server.proc.pid)
        assert replacement != worker
        assert httpx.get(f"{server.http_url}/health", timeout=10).status_code == 200
        metrics = httpx.get(f"{server.http_url}/metrics", timeout=10).text
        assert "quire_worker_restarts_total" in metrics
