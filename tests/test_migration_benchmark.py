"""benchmarks/migration.py at a small size: a replica killed under live streams loses,
repeats and changes no token, and leaks no block on the survivor."""
from __future__ import annotations

import json


def test_small_run_moves_streams_without_a_token_lost(load_script, tiny_checkpoint, tmp_path):
    migration = load_script("benchmarks/migration.py")
    report = migration.main(["--model", str(tiny_checkpoint("llama-gqa4")), "--streams", "8", "--output-len", "12",
                             "--num-kv-blocks", "128", "--out", str(tmp_path)])
    assert report["moved_streams"] > 0 and report["migrated_samples"] == report["moved_streams"]
    assert (report["streams_exact"], report["tokens_lost"], report["tokens_duplicated"]) == (8, 0, 0)
    assert report["blocks_leaked_on_survivors"] == 0
    assert json.loads((tmp_path / "migration.json").read_text()) == report
