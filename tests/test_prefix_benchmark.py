"""benchmarks/prefix.py's host-tier workload, small: the figures are consistent with each other."""
from __future__ import annotations

import json


def test_the_host_tier_workload_reports_consistent_figures(load_script, tiny_checkpoint, tmp_path):
    prefix = load_script("benchmarks/prefix.py")
    out = tmp_path / "prefix.json"
    report = prefix.main(["--model", str(tiny_checkpoint("llama-gqa4")), "--skip-shared-unique",
                          "--conversations", "6", "--conversation-prefix-len", "64", "--user-len", "8",
                          "--turn-output-len", "4", "--turns", "3", "--tier-host-memory", str(4 << 20),
                          "--out", str(out)])
    assert json.loads(out.read_text())["host_tier"] == report["host_tier"]
    runs, summary = report["host_tier"]["runs"], report["host_tier"]["summary"]
    without, with_tier = runs["without_tier"], runs["with_tier"]
    # Turn t's prompt: the 64-token opening, t earlier turns of 8 + 4 tokens, 8 new ones.
    assert without["prompt_tokens"] == with_tier["prompt_tokens"] == 6 * sum(64 + 12 * t + 8 for t in range(3))
    assert without["host_hit_rate"] == 0 and without["loaded_blocks"] == 0 and without["host_blocks"] == 0
    assert with_tier["host_hit_rate"] > 0 and with_tier["loaded_blocks"] > 0 and with_tier["offloaded_blocks"] > 0
    for run in runs.values():
        assert run["prefill_tokens"] == round(run["prompt_tokens"] * (1 - run["hit_rate"]))
        assert abs(run["hit_rate"] - run["device_hit_rate"] - run["host_hit_rate"]) < 1e-9
        assert 0 < run["ttft_p50"] <= run["ttft_p90"]
    assert summary["identical_tokens"] is True
    assert summary["prefill_tokens_ratio"] == with_tier["prefill_tokens"] / without["prefill_tokens"] < 1
