"""The GPU check (benchmarks/gpu_check.sh, gpu_check.py) checked on the CPU: its dry run goes
through every section without Ray or FastAPI, a section that raises is recorded while the
others still run and the JSON is kept, and too old a protobuf or grpcio stops it early with
both versions named (as importing quire.protos does)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_gpu_image_imports import GPU_IMAGE_BLOCKER

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ["environment", "wire_versions", "kernels", "checkpoint", "parity_float16", "parity_bfloat16",
            "kv_profiling", "decode_graphs", "transport"]

# Installed as sitecustomize in every interpreter the dry run starts (the worker process too):
# the GPU image has none of the packages it blocks, so the check must not import them.
BLOCKER = GPU_IMAGE_BLOCKER


@pytest.fixture
def gpu_check(load_script):
    return load_script("benchmarks/gpu_check.py")


def dry_run_env(tmp_path: Path, tokenizer_dir: Path) -> dict:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    out = tmp_path / "out"
    out.mkdir()
    return {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "DRY_RUN": "1",
            "QUIRE_CACHE_DIR": str(tokenizer_dir.parent),  # the session's built tokenizer, not a new one
            "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


def test_dry_run_through_the_script_runs_every_section(tmp_path, tokenizer_dir):
    env = dry_run_env(tmp_path, tokenizer_dir)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    report = json.loads(Path(env["OUT"], "gpu_check.json").read_text())
    failing = {name: {key: section.get(key) for key in ("status", "error", "token_agreement", "backend",
                                                         "max_prompt_logit_error", "logit_tolerance")}
               for name, section in report["sections"].items() if section["status"] not in ("passed", "skipped")}
    assert proc.returncode == 0, f"failing sections: {failing}\nstderr: {proc.stderr[-2000:]}"
    assert report["dry_run"] is True and report["ok"] is True
    sections = report["sections"]
    assert list(sections) == SECTIONS
    assert sections["kv_profiling"]["status"] == "skipped"
    assert sections["kv_profiling"]["skipped"] == "skipped: needs CUDA"
    assert sections["kv_profiling"]["planned_blocks_8gib"] > 0  # the half that needs no CUDA ran
    assert all(sections[name]["status"] == "passed" for name in SECTIONS if name != "kv_profiling"), sections
    versions = sections["environment"]["versions"]
    assert {"torch", "triton", "protobuf", "grpcio", "setuptools"} <= versions.keys()
    assert sections["environment"]["device"]["type"] == "cpu"
    assert sections["parity_float16"]["dtype"] == "float32" and sections["parity_float16"]["backend"] == "cpu"
    quantized = sections["kernels"]["quantized_kv"]  # int8 and fp8 caches through the Triton kernels
    assert quantized["ok"] and {c["cache_dtype"] for c in quantized["cases"]} == {"torch.int8", "torch.float8_e4m3fn"}
    assert all(c["writes_exact"] and c["max_error"] <= c["tolerance"] for c in quantized["cases"])
    assert sections["transport"]["token_agreement"]["overall"] == 1.0  # float32 on the CPU: no near-ties flip
    # kernel_bench ran in its own dry run, or (before it had one) was skipped with a note.
    bench = json.loads(Path(env["OUT"], "kernel_bench.json").read_text())
    assert "skipped" in bench or bench.get("results"), bench


def test_a_raising_section_is_recorded_and_the_rest_still_reported(tmp_path, tokenizer_dir):
    env = dry_run_env(tmp_path, tokenizer_dir)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--dry-run", "--out", env["OUT"],
                           "--fail-section", "checkpoint"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = json.loads(Path(env["OUT"], "gpu_check.json").read_text())
    sections = report["sections"]
    assert list(sections) == SECTIONS and report["ok"] is False
    failed = sections["checkpoint"]
    assert failed["status"] == "error" and "injected failure" in failed["error"]
    assert "Traceback" in failed["traceback"]
    assert [sections[name]["status"] for name in ("environment", "wire_versions", "kernels")] == ["passed"] * 3
    # The sections after it ran, and said why they had nothing to check.
    assert all("checkpoint section" in sections[name]["skipped"]
               for name in ("parity_float16", "parity_bfloat16", "kv_profiling", "transport"))


def test_each_section_is_written_as_it_ends_and_an_error_does_not_stop_the_next(gpu_check, tmp_path):
    report = gpu_check.Report(tmp_path, dry_run=True, fail_section=None)
    seen = []

    def boom():
        raise ValueError("no such thing")

    def after():
        seen.append(json.loads((tmp_path / "gpu_check.json").read_text())["sections"])
        return {"ok": True}

    report.run("first", lambda: {"ok": True})
    report.run("broken", boom)
    report.run("after", after)
    # While `after` ran, the file already held the error before it and named it as running.
    assert seen[0]["broken"]["status"] == "error" and seen[0]["after"] == {"status": "running"}
    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["status"] for s in written["sections"].values()] == ["passed", "error", "passed"]
    assert written["sections"]["broken"]["error"] == "ValueError: no such thing" and written["ok"] is False


def test_token_agreement_counts_positions_up_to_the_first_divergence(gpu_check):
    agreement = gpu_check.token_agreement([[1, 2, 3, 4], [5, 6], [7, 8, 9, 9]], [[1, 2, 0, 4], [5, 6], [0, 8, 9, 9]])
    assert agreement["matched_prefix_lengths"] == [2, 2, 0]  # position 3 of the first agrees again: not counted
    assert agreement["per_request"] == [0.5, 1.0, 0.0]
    assert agreement["overall"] == 4 / 10 and agreement["identical_requests"] == 1


def test_too_old_wire_versions_stop_the_check_before_quire(gpu_check, tmp_path, monkeypatch):
    installed = {"protobuf": "5.29.3", "grpcio": "1.85.3", "triton": None, "setuptools": "70.0",
                 "transformers": "4.51"}
    monkeypatch.setattr(gpu_check, "_version", installed.get)
    assert gpu_check.main(["--out", str(tmp_path)]) == 3
    wire = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["wire_versions"]
    assert wire["status"] == "failed" and wire["installed"]["protobuf"] == "5.29.3"
    assert wire["problems"] == [f"protobuf 5.29.3 is installed, the generated code in protos/ needs "
                                f"protobuf>={wire['needed']['protobuf']}"]


def test_protos_names_the_versions_its_generated_code_needs():
    """The constants in quire.protos are the ones the generated code checks for."""
    import quire.protos as protos

    for path in (ROOT / "protos").glob("*_pb2.py"):
        assert re.search(r"Protobuf Python Version: ([\d.]+)", path.read_text())[1] == protos.PROTOBUF_NEEDED
    for path in (ROOT / "protos").glob("*_pb2_grpc.py"):
        assert re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", path.read_text())[1] == protos.GRPCIO_NEEDED
    assert protos.version_tuple("7.36.2") == (7, 36, 2) and protos.version_tuple("6.31.0rc1") == (6, 31, 0)


def test_importing_protos_with_an_old_protobuf_names_both_versions(tmp_path):
    fake = tmp_path / "google" / "protobuf"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '4.25.3'\n")
    (fake.parent / "__init__.py").write_text("")  # a regular package: it shadows the installed `google`
    proc = subprocess.run([sys.executable, "-c", "import quire.protos.step"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=60)
    assert proc.returncode != 0
    import quire.protos as protos

    assert (f"ImportError: quire.protos needs protobuf>={protos.PROTOBUF_NEEDED} (its generated code checks for "
            f"the version that generated it); protobuf 4.25.3 is installed") in proc.stderr


def test_without_cuda_and_without_dry_run_it_says_so(gpu_check, tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] is False and "no CUDA device" in report["error"]
    assert list(report["sections"]) == ["environment", "wire_versions"]
