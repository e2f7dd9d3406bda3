"""benchmarks/elastic.py at tiny sizes (`--quick`): a short load step takes the deployment
up and back down through the router's autoscaler, with no request failed, and writes a
consistent report and a chart."""
from __future__ import annotations

import json

import pytest


def test_quick_ramp_scales_up_and_down_without_a_failure(load_script, tiny_checkpoint, tmp_path):
    elastic = load_script("benchmarks/elastic.py")
    report = elastic.main(["--quick", "--model", str(tiny_checkpoint("llama-gqa4")), "--out", str(tmp_path)])
    totals = report["totals"]
    assert totals["failed"] == 0 and totals["completed"] == totals["requests"] > 0
    assert totals["scale_ups"] >= 1 and totals["scale_downs"] >= 1
    assert totals["peak_serving_replicas"] == 2 and totals["final_serving_replicas"] == 1
    ups = [e for e in report["scale_events"] if e["direction"] == "up"]
    downs = [e for e in report["scale_events"] if e["direction"] == "down"]
    assert all(0 < e["decision_to_serving_s"] for e in ups)
    assert all(e["decision_to_first_token_s"] is None or e["decision_to_first_token_s"] >= e["decision_to_serving_s"]
               for e in ups)
    assert all(e["drain_s"] is not None and e["drain_s"] >= 0 for e in downs)
    assert ups[0]["t"] < downs[0]["t"]
    series = report["series"]
    assert series and all(a["t"] < b["t"] for a, b in zip(series, series[1:]))
    assert sum(s["output_tokens_per_s"] * (b["t"] - a["t"]) for a, b, s in zip([{"t": 0.0}] + series, series, series)) \
        == pytest.approx(totals["output_tokens"], rel=0.01)
    assert 0 < totals["ttft_s_p50"] <= totals["ttft_s_p90"]
    assert json.loads((tmp_path / "elastic.json").read_text())["totals"] == json.loads(json.dumps(totals))
    assert (tmp_path / "elastic.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

