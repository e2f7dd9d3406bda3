"""benchmarks/kernel_bench.py runs anywhere in its dry-run mode (tiny shapes; on the CPU
through Triton's interpreter) and writes the report layout a GPU run writes."""
import json

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (pip install 'quire[triton]')")


def test_dry_run_writes_the_full_report(load_script, monkeypatch, tmp_path):
    bench = load_script("benchmarks/kernel_bench.py")
    monkeypatch.setenv("OUT", str(tmp_path))
    bench.main(["--dry-run"])
    report = json.loads((tmp_path / "kernel_bench.json").read_text())
    assert report["dry_run"] is True and report["dtypes"] == ["float16", "bfloat16"]
    assert report["copy_gb_per_s"] > 0
    for dtype in report["dtypes"]:
        assert set(report["results"][dtype]) == set(bench.SHAPES) == set(report["warm_up"][dtype])
        for name, rows in report["results"][dtype].items():
            assert 1 <= report["warm_up"][dtype][name]["variants"] <= 6
            assert {row["num_splits"] for row in rows} > {1}, "the dry run reaches the split path"
            for row in rows:
                assert row["paged_seconds"] > 0 and row["sdpa_contiguous_seconds"] > 0
                assert row["launches_per_pair"] >= row["input_copies"] >= 1
                assert row["max_abs_error_vs_sdpa"] < 2e-2


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8_e4m3"])
def test_dry_run_times_quantized_caches(load_script, monkeypatch, tmp_path, kv_cache_dtype):
    bench = load_script("benchmarks/kernel_bench.py")
    monkeypatch.setattr(bench, "DTYPES", (torch.float16,))  # one dtype, one shape: a short run
    monkeypatch.setattr(bench, "SHAPES", {"llama3-8b": bench.SHAPES["llama3-8b"]})
    monkeypatch.setenv("OUT", str(tmp_path))
    bench.main(["--dry-run", "--kv-cache-dtype", kv_cache_dtype])
    report = json.loads((tmp_path / "kernel_bench.json").read_text())
    assert report["kv_cache_dtype"] == kv_cache_dtype
    assert 1 <= report["warm_up"]["float16"]["llama3-8b"]["variants"] <= 6
    rows = report["results"]["float16"]["llama3-8b"]
    assert {row["num_splits"] for row in rows} > {1}
    kv_heads, head_dim = 8 // 2, 32  # the dry run's shape
    for row in rows:
        # One code byte per element and a 2-byte scale per token and KV head, for K and V.
        assert row["kv_bytes"] == 2 * row["batch"] * row["context"] * kv_heads * (head_dim + 2)
        assert row["max_abs_error_vs_sdpa"] < 2e-2  # SDPA attends the dequantized values
