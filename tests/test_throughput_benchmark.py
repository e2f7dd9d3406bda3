"""benchmarks/throughput.py and benchmarks/step_profile.py on tiny models: the long workload's
options, HF generate's best static batch size, the attention share and the step profile's
categories are reported and consistent."""
from __future__ import annotations

import pytest

TINY_LONG = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=256)


@pytest.fixture(scope="module")
def throughput(load_script):
    return load_script("benchmarks/throughput.py")


@pytest.fixture
def tiny_long(monkeypatch, throughput):
    """The long workload's code path on a tiny model, and short requests."""
    for key, value in TINY_LONG.items():
        monkeypatch.setitem(throughput._workloads.LONG_MODEL, key, value)
    monkeypatch.setitem(throughput.WORKLOADS, "long", (3, (4, 12), (2, 5)))
    return throughput


def test_long_workload_presets(throughput):
    args = throughput.parse_args(["--workload", "long"])
    assert (args.num_requests, args.input_len, args.output_len) == (64, (32, 512), (16, 256))
    assert args.hf_batch_sizes == [8, 16, 32, 64]
    args = throughput.parse_args(["--workload", "long", "--num-requests", "8", "--hf-batch-sizes", "4"])
    assert (args.num_requests, args.hf_batch_sizes) == (8, [4])
    args = throughput.parse_args([])
    assert (args.num_requests, args.input_len, args.output_len, args.hf_batch_sizes) == (64, (32, 128), (32, 128), [16])


def test_attention_timer_wraps_and_restores(throughput):
    class Backend:
        def write_kv(self, *args, **kwargs):
            return "written"

        def attend(self, *args, **kwargs):
            return "attended"

    backend = Backend()
    with throughput.AttentionTimer(backend) as timer:
        assert backend.write_kv(1, k_scale=None) == "written" and backend.attend(2) == "attended"
        backend.attend(3)
    assert timer.calls == {"write_kv": 1, "attend": 2} and timer.total_seconds >= 0
    assert "attend" not in vars(backend) and "write_kv" not in vars(backend), "the instance is left as it was"


def test_long_workload_end_to_end(tiny_long, tmp_path):
    out = tmp_path / "report.json"
    report = tiny_long.main(["--workload", "long", "--peers", "quire,hf_generate", "--hf-batch-sizes", "1,3",
                             "--attention-share", "--check-requests", "2", "--warmup-requests", "1",
                             "--out", str(out)])
    assert out.exists()
    assert report["config"]["skip_tokenizer_init"] is True, "the built checkpoint has no tokenizer"
    assert report["config"]["vocab_size"] == TINY_LONG["vocab_size"]
    hf = report["results"]["hf_generate"]
    assert hf["batch_size"] in (1, 3) and set(hf["wall_seconds_by_batch_size"]) == {1, 3}
    assert hf["wall_seconds"] == min(hf["wall_seconds_by_batch_size"].values())
    quire = report["results"]["quire"]
    assert quire["useful_output_tokens"] == report["config"]["total_output_tokens"]
    share = report["quire_attention_share"]
    assert 0 < share["share_of_wall"] < 1 and share["calls"]["attend"] == share["calls"]["write_kv"] > 0
    assert report["quire_greedy_matches_hf"] == "2/2"
    assert report["quire_vs_peer_all_requests"]["hf_generate"]["exact_matches"] == 3


def test_step_profile_categories(load_script, monkeypatch):
    step_profile = load_script("benchmarks/step_profile.py")
    for key, value in TINY_LONG.items():
        monkeypatch.setitem(step_profile.workloads.LONG_MODEL, key, value)
    monkeypatch.setitem(step_profile.workloads.WORKLOADS, "long", (3, (4, 40), (2, 6)))
    report = step_profile.main(["--num-requests", "3", "--torch-ops", "5"])
    assert report["instrumented_tokens_match_uninstrumented"]
    profile = report["profile"]
    assert report["steps"] > 0 and report["forward_steps"] == report["steps"]
    shares = [row["share"] for row in profile["categories"].values()]
    assert sum(shares) == pytest.approx(1, abs=0.01) and min(shares) >= 0
    for category in ("attention", "gemm (linear layers)", "gemm (LM head)", "norms", "rotary",
                     "activation (SiLU*mul)", "sampler", "model runner python", "copies/other (model glue)"):
        assert category in profile["categories"], category
    layers = TINY_LONG["num_hidden_layers"]
    calls = {name: row["calls"] for name, row in profile["ranges_exclusive"].items()}
    assert calls["attention.attend"] == calls["activation"] == layers * report["steps"]
    kinds = report["attention_by_step_kind"]
    assert kinds["decode_only"]["calls"] + kinds["with_prefill"]["calls"] == calls["attention.attend"]
    assert kinds["with_prefill"]["calls"] >= layers  # the prompts are computed: no cache across the runs
    assert kinds["decode_only"]["kv_bytes_read"] > 0 and report["machine_read_gbps"] > 0
    assert report["gemm_floor"]["forwards"] == report["steps"] and report["gemm_floor"]["gflops"] > 0
    assert len(report["torch_ops_by_self_cpu"]) == 5
