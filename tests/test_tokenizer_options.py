"""Checkpoints without tokenizer files: the clear error naming --tokenizer, `--tokenizer PATH`
(`LLM(tokenizer=...)`) and `--skip-tokenizer-init` (token-id prompts only) offline, over HTTP
and over gRPC."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import httpx
import pytest
import uvicorn

from quire.cluster.cli import main
from quire.cluster.core.config import EngineConfig, ModelConfig
from quire.cluster.core.detokenizer import IncrementalDetokenizer
from quire.cluster.core.engine import Engine
from quire.cluster.serving.llm import LLM
from quire.cluster.core.model_info import ModelInfo
from quire.cluster.serving.openai_protocol import CompletionLogprobs, chat_logprobs
from quire.protos import generate_pb2 as pb
from quire.protos import generate_pb2_grpc
from quire.protos.step import SamplingParams

SMALL = dict(num_kv_blocks=32, max_model_len=128)
PROMPT_IDS = [5, 17, 42, 99, 7]
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def full_checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama-mha")


@pytest.fixture(scope="module")
def bare_checkpoint(full_checkpoint, tmp_path_factory) -> Path:
    """The same weights and config with no tokenizer files."""
    bare = tmp_path_factory.mktemp("bare")
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(full_checkpoint / name, bare / name)
    return bare


@pytest.fixture(scope="module")
def expected(full_checkpoint):
    """Greedy token ids of PROMPT_IDS on the checkpoint with its tokenizer, and its tokenizer."""
    llm = LLM(model=str(full_checkpoint), **SMALL)
    try:
        (output,) = llm.generate([PROMPT_IDS], GREEDY, use_tqdm=False)
        return SimpleNamespace(ids=list(output.outputs[0].token_ids), text=output.outputs[0].text,
                               tokenizer=llm.get_tokenizer())
    finally:
        llm.shutdown()


def test_missing_tokenizer_is_a_clear_error(bare_checkpoint, tmp_path):
    with pytest.raises(ValueError) as error:
        ModelInfo.load(ModelConfig(model=str(bare_checkpoint)))
    message = str(error.value)
    assert message.startswith("`tokenizer`: no tokenizer found in")
    assert "--tokenizer" in message and "--skip-tokenizer-init" in message
    assert error.value.__suppress_context__ and error.value.__cause__ is None  # no transformers traceback
    with pytest.raises(ValueError, match=r"^`tokenizer`: .*is not a directory.*--tokenizer"):
        ModelInfo.load(ModelConfig(model=str(bare_checkpoint), tokenizer=str(tmp_path / "missing")))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"^`tokenizer`: cannot load the tokenizer in .*--skip-tokenizer-init"):
        ModelInfo.load(ModelConfig(model=str(bare_checkpoint), tokenizer=str(broken)))
    with pytest.raises(ValueError, match="not both"):
        EngineConfig.from_kwargs(model=str(bare_checkpoint), tokenizer=str(broken), skip_tokenizer_init=True)


def test_cli_reports_missing_tokenizer_without_traceback(bare_checkpoint):
    # A subprocess: only there would transformers' own logging or a traceback show on stderr.
    from test_cli import quire_command

    result = subprocess.run([*quire_command(), "generate", "--model", str(bare_checkpoint),
                             "--prompt", "Hello", "--num-kv-blocks", "16", "--max-model-len", "64"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("quire: error: `tokenizer`: no tokenizer found"), result.stderr
    assert "--tokenizer" in lines[0] and "--skip-tokenizer-init" in lines[0]


def test_tokenizer_option_matches_the_full_checkpoint(bare_checkpoint, tokenizer_dir, expected):
    llm = LLM(model=str(bare_checkpoint), tokenizer=str(tokenizer_dir), **SMALL)
    try:
        by_ids, by_text = llm.generate([PROMPT_IDS, expected.tokenizer.decode(PROMPT_IDS)], GREEDY, use_tqdm=False)
    finally:
        llm.shutdown()
    assert list(by_ids.outputs[0].token_ids) == expected.ids
    assert by_ids.outputs[0].text == expected.text and expected.text
    assert by_text.prompt_token_ids == expected.tokenizer.encode(expected.tokenizer.decode(PROMPT_IDS))


def test_skip_tokenizer_init_offline(bare_checkpoint, expected):
    llm = LLM(model=str(bare_checkpoint), skip_tokenizer_init=True, **SMALL)
    try:
        assert llm.get_tokenizer() is None
        # EOS comes from config.json / generation_config.json alone.
        assert llm.engine.info.eos_token_ids == {expected.tokenizer.eos_token_id}
        (output,) = llm.generate([PROMPT_IDS], GREEDY, use_tqdm=False)
        assert list(output.outputs[0].token_ids) == expected.ids
        assert output.outputs[0].text == "" and output.outputs[0].finish_reason == "length"
        # Stopping on a token id still works; on a string it cannot.
        stop_at = expected.ids[2]
        (stopped,) = llm.generate([PROMPT_IDS], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                                               stop_token_ids=[stop_at]), use_tqdm=False)
        assert list(stopped.outputs[0].token_ids) == expected.ids[:expected.ids.index(stop_at) + 1]
        assert stopped.outputs[0].stop_reason == stop_at
        with pytest.raises(ValueError, match=r"^`prompt`: .*--skip-tokenizer-init"):
            llm.generate("Hello", GREEDY, use_tqdm=False)
        with pytest.raises(ValueError, match=r"^`stop` .*--skip-tokenizer-init"):
            llm.generate([PROMPT_IDS], SamplingParams(max_tokens=4, stop=["x"]), use_tqdm=False)
        assert not llm.engine.has_unfinished() and llm.engine.kv_usage == 0
    finally:
        llm.shutdown()


def test_cli_generate_with_token_ids(bare_checkpoint, expected, capsys):
    common = ["generate", "--model", str(bare_checkpoint), "--skip-tokenizer-init", "--max-tokens", "6",
              "--ignore-eos", "--num-kv-blocks", "32", "--max-model-len", "128"]
    assert main([*common, "--prompt-token-ids", ",".join(map(str, PROMPT_IDS)), "--json"]) == 0
    out = capsys.readouterr().out
    assert f'"token_ids": {expected.ids}' in out and '"text": ""' in out
    assert main([*common, "--prompt", "Hello"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("quire: error: `prompt`:") and "--skip-tokenizer-init" in err
    assert main(["serve", "--model", str(bare_checkpoint), "--skip-tokenizer-init", "--chat-template", "x"]) == 2
    assert "`--chat-template` needs a tokenizer" in capsys.readouterr().err


def test_detokenizer_without_tokenizer():
    detok = IncrementalDetokenizer(None, PROMPT_IDS, [])
    assert detok.append([1, 2, 3]) is None and detok.output_text == ""
    assert detok.take_delta(False) == "" and detok.take_delta(True) == ""
    with pytest.raises(ValueError, match="`stop`"):
        IncrementalDetokenizer(None, PROMPT_IDS, ["x"])


def test_logprob_helpers_without_tokenizer():
    logprobs = [{7: -0.5, 9: -1.5}, {3: -0.25}]
    rendered = CompletionLogprobs(None).build([7, 3], logprobs)
    assert rendered == {"tokens": ["token_id:7", "token_id:3"], "token_logprobs": [-0.5, -0.25],
                        "top_logprobs": [{"token_id:7": -0.5, "token_id:9": -1.5}, {"token_id:3": -0.25}],
                        "text_offset": [0, 0]}
    (first, _) = chat_logprobs(None, [7, 3], logprobs, top=1)["content"]
    assert first == {"token": "token_id:7", "logprob": -0.5, "bytes": None,
                     "top_logprobs": [{"token": "token_id:7", "logprob": -0.5, "bytes": None}]}


@pytest.fixture(scope="module")
def server(bare_checkpoint):
    """HTTP (uvicorn, port 0, a background thread) and gRPC over one engine with no tokenizer."""
    from quire.cluster.serving.api_server import build_app
    from quire.cluster.serving.async_engine import AsyncEngine
    from quire.cluster.serving.grpc_server import GrpcFrontend

    engine = AsyncEngine(Engine(EngineConfig.from_kwargs(model=str(bare_checkpoint), skip_tokenizer_init=True,
                                                         **SMALL)))
    frontends = []

    async def start_grpc():
        frontend = GrpcFrontend(engine, "127.0.0.1:0")
        await frontend.start()
        frontends.append(frontend)

    async def stop_grpc():
        for frontend in frontends:
            await frontend.stop(0)

    uv = uvicorn.Server(uvicorn.Config(build_app(engine, on_startup=start_grpc, on_shutdown=stop_grpc),
                                       host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=uv.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not (uv.started or not thread.is_alive() or time.monotonic() > deadline):
        time.sleep(0.02)
    assert uv.started
    port = uv.servers[0].sockets[0].getsockname()[1]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client, \
                grpc.insecure_channel(f"127.0.0.1:{frontends[0].port}") as channel:
            yield SimpleNamespace(client=client, stub=generate_pb2_grpc.GenerateStub(channel), engine=engine)
    finally:
        uv.should_exit = True
        thread.join(10)
        engine.shutdown()


def test_http_without_tokenizer(server, expected):
    def refused(path: str, body: dict, param: str):
        response = server.client.post(path, json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and "--skip-tokenizer-init" in error["message"], error
        return error

    refused("/v1/completions", {"prompt": "Hello", "max_tokens": 4}, "prompt")
    refused("/v1/completions", {"prompt": PROMPT_IDS, "max_tokens": 4, "stop": ["x"]}, "stop")
    refused("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}, "messages")

    body = {"prompt": PROMPT_IDS, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": 2}
    response = server.client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    (choice,) = response.json()["choices"]
    assert choice["text"] == "" and choice["finish_reason"] == "length"
    assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in expected.ids]
    assert all(f"token_id:{t}" in top for t, top in zip(expected.ids, choice["logprobs"]["top_logprobs"]))
    assert response.json()["usage"]["completion_tokens"] == 6

    with server.client.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
        assert stream.status_code == 200
        chunks = [line[len("data: "):] for line in stream.iter_lines() if line.startswith("data: ")]
    assert chunks[-1] == "[DONE]"
    streamed = [t for c in chunks[:-1] for t in json.loads(c)["choices"][0]["logprobs"]["tokens"]]
    assert streamed == [f"token_id:{t}" for t in expected.ids]


def test_grpc_without_tokenizer(server, expected):
    with pytest.raises(grpc.RpcError) as error:
        server.stub.Tokenize(pb.TokenizeRequest(text="Hello"), timeout=10)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "--skip-tokenizer-init" in error.value.details()

    options = pb.SamplingOptions(max_tokens=6, temperature=0, ignore_eos=True)
    with pytest.raises(grpc.RpcError) as error:
        list(server.stub.Generate(pb.GenerateRequest(text="Hello", sampling=options), timeout=10))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "`prompt`" in error.value.details()

    options.logprobs = 1
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT_IDS), sampling=options)
    messages = list(server.stub.Generate(request, timeout=30))
    assert [t for m in messages for t in m.token_ids] == expected.ids
    assert all(m.text == "" for m in messages)
    entries = [e for m in messages for e in m.logprobs]
    assert [e.token.token_id for e in entries] == expected.ids and all(e.token.text == "" for e in entries)
