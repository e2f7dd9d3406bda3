"""benchmarks/routing.py at tiny sizes (`--quick`): the simulation over 1, 2 and 4 replicas and
the DP=2 run of a tiny model through the real router write a consistent report and a chart."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def routing():
    """The script as a module, registered under its name while the tests run (its dataclasses
    look their module up in sys.modules)."""
    spec = importlib.util.spec_from_file_location("routing_benchmark", ROOT / "benchmarks/routing.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_workload_is_seeded_and_sized(routing):
    make = lambda: routing.make_workload(3, 4, 40, 10, 2.0, (2, 3), (5, 9), (3, 6), 0.5, 16)  # noqa: E731
    work = make()
    assert [(c.tenant, c.start_s, [t.user for t in c.turns]) for c in work.conversations] == \
        [(c.tenant, c.start_s, [t.user for t in c.turns]) for c in make().conversations]
    assert len(work.system_prompts) == 4 and all(len(p) == 40 for p in work.system_prompts)
    starts = [c.start_s for c in work.conversations]
    assert starts == sorted(starts) and starts[0] == 0.0
    for conv in work.conversations:
        assert 2 <= len(conv.turns) <= 3
        assert all(5 <= len(t.user) <= 9 and len(t.output) == t.output_len and 3 <= t.output_len <= 6
                   for t in conv.turns)
    # System prompts: 2 full blocks each; per conversation, its history's blocks beyond them.
    expected = 4 * 2 + sum((40 + sum(len(t.user) + t.output_len for t in c.turns)) // 16 - 2
                           for c in work.conversations)
    assert work.working_set_blocks() == expected


def test_oracle_hits_a_shared_prefix_and_a_conversation(routing):
    oracle = routing.Oracle(64, 4, b"k" * 32)
    system = list(range(10, 22))  # 3 blocks
    oracle.arrive("a", system + [1, 2], "s")
    oracle.finish("a", [5, 6, 7])
    oracle.arrive("b", system + [3, 4], "s")          # the system prompt's 3 blocks
    oracle.arrive("c", system + [1, 2, 5, 6, 7, 9], "s")  # a's whole history (4 full blocks)
    oracle.arrive("d", system + [1, 2], "other salt")     # nothing: another tenant's salt
    report = oracle.report()
    assert report["hit_tokens"] == 12 + 16 + 0
    assert report["prompt_tokens"] == 14 + 14 + 18 + 14


def test_quick_run_is_consistent(routing, tmp_path, tiny_checkpoint):
    model = tiny_checkpoint("llama-gqa4")
    report = routing.main(["--quick", "--model", str(model), "--out", str(tmp_path)])
    assert json.loads((tmp_path / "routing.json").read_text())["goals"] == report["goals"]
    assert (tmp_path / "routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    policies = set(routing.POLICIES)
    sim = report["simulated"]
    assert set(sim["runs"]) == set(sim["decision_1k"]) == {"1", "2", "4"}
    for n, rows in sim["runs"].items():
        assert set(rows) == policies
        for name, row in rows.items():
            assert row["replicas"] == int(n) and row["requests"] > 0
            assert row["prefill_tokens"] == row["looked_up_tokens"] - row["hit_tokens"] > 0
            assert row["looked_up_tokens"] >= row["prompt_tokens"]  # more only when a preemption recomputed
            assert row["prompt_tokens"] == routing.sim_workload(routing.parse_args(["--quick"]), int(n)).prompt_tokens()
            assert 0 <= row["hit_rate"] <= 1 and 0 <= row["oracle_hit_rate"] <= 1
            assert row["decisions_per_s"] > 0 and sim["decision_1k"][n][name]["decisions_per_s"] > 0
            assert row["oracle_unplaced_requests"] == 0  # the oracle's pool holds the working set
            assert sum(row["requests_per_replica_min_max"]) > 0
    single = sim["runs"]["1"]
    # One replica: where to route is no choice, so every policy sees the same run.
    assert len({(r["hit_tokens"], r["prefill_tokens"]) for r in single.values()}) == 1
    assert sim["runs"]["4"]["cache_aware"]["prefill_tokens"] <= sim["runs"]["4"]["round_robin"]["prefill_tokens"]

    dp = report["dp2"]
    assert set(dp["results"]) == policies
    workload = routing.dp_workload(routing.parse_args(["--quick"]))
    outputs = sum(t.output_len for c in workload.conversations for t in c.turns)
    for row in dp["results"].values():
        assert row["requests"] == workload.num_requests
        assert row["output_tokens"] == outputs  # ignore_eos: every answer has its full length
        assert row["prefill_tokens"] == row["looked_up_tokens"] - row["hit_tokens"] > 0
        assert row["looked_up_tokens"] >= workload.prompt_tokens() == dp["workload"]["prompt_tokens"]
        assert 0 <= row["hit_rate"] <= 1 and 0 < row["oracle_hit_rate"] <= 1
        assert 0 < row["ttft_s_p50"] <= row["ttft_s_p90"] and row["output_tokens_per_s"] > 0
    assert set(report["goals"]) >= {"dp2_prefill_ratio_cache_aware_over_round_robin",
                                    "dp2_cache_aware_hit_rate_vs_oracle", "sim_cache_aware_hit_rate_vs_oracle"}
    assert all(goal["met"] in (True, False, None) for goal in report["goals"].values())
