"""benchmarks/kv_accuracy.py on one tiny family: every row present, figures in range, and the
reference against itself gives KL 0 and full agreement."""
from __future__ import annotations

import json
import math

import pytest
import torch


@pytest.fixture(scope="module")
def kv_accuracy(load_script):
    return load_script("benchmarks/kv_accuracy.py")


def test_small_run(kv_accuracy, tmp_path, tokenizer_dir):
    out = tmp_path / "kv_accuracy.json"
    report = kv_accuracy.main(["--families", "llama", "--dtypes", "auto,int8,fp8_e4m3", "--num-prompts", "2",
                               "--prompt-len", "12", "--max-tokens", "8", "--out", str(out)],
                              tokenizer_dir=tokenizer_dir)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    rows = {(r["family"], r["dtype"]): r for r in report["rows"]}
    assert set(rows) == {("llama", d) for d in ("auto", "int8", "fp8_e4m3")}
    for row in rows.values():
        assert math.isfinite(row["kl_mean"]) and math.isfinite(row["kl_max"])
        assert 0 <= row["kl_mean"] <= row["kl_max"]
        for key in ("exact_match", "position_match"):
            assert 0 <= row[key] <= 1
        assert 0 <= row["common_prefix"] <= 8
        assert row["kl_positions"] == 2 * 8 and row["num_prompts"] == 2
        assert row["ref_runner_argmax_match"] == 1.0  # the teacher-forced runner follows the engine's greedy tokens
    same = rows[("llama", "auto")]
    assert same["kl_mean"] == same["kl_max"] == 0.0
    assert same["exact_match"] == same["position_match"] == 1.0 and same["common_prefix"] == 8
    # A quantized cache does change the distributions (the harness reads the quantized pool).
    assert rows[("llama", "int8")]["kl_max"] > 0 and rows[("llama", "fp8_e4m3")]["kl_max"] > 0
    assert "fp8_e4m3" in kv_accuracy.format_table(report)


def test_agreement_and_kl_arithmetic(kv_accuracy):
    a = kv_accuracy.agreement([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 9, 4], [5, 6, 7, 8]])
    assert a == {"exact_match": 0.5, "position_match": pytest.approx(7 / 8), "common_prefix": 3.0}
    logits = torch.randn(3, 5, 11)
    assert torch.equal(kv_accuracy.kl_divergence(logits, logits), torch.zeros(3, 5, dtype=torch.float64))
    p = torch.tensor([[0.0, 0.0]])
    q = torch.tensor([[math.log(3.0), 0.0]])  # softmax: (3/4, 1/4)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert kv_accuracy.kl_divergence(p, q).item() == pytest.approx(expected)
