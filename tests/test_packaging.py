"""A normal (non-editable) install carries every subpackage, the .proto files, the C++ kernel
sources, the shipped default model and the CLI."""
import subprocess
import sys
import zipfile
from pathlib import Path

from quire.cluster.tools.default_model import REQUIRED_FILES

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_maps_top_level_folders_into_the_quire_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("quire-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ["quire/cluster/core/engine.py", "quire/cluster/core/scheduler.py", "quire/worker/model_runner.py",
                   "quire/worker/models/llama.py", "quire/kernels/attention_ref.py", "quire/protos/worker_pb2.py",
                   "quire/kernels/cpu_attention.py", "quire/kernels/csrc/paged_attention_cpu.cpp",
                   "quire/kernels/csrc/simd.h", "quire/kernels/csrc/attention_tiles.h", "quire/kernels/csrc/attention_items.h", "quire/kernels/csrc/layers_cpu.cpp", "quire/kernels/cpu_extension.py",
                   "quire/kernels/cpu_layers.py",
                   "quire/protos/worker.proto", "quire/cluster/executor/inproc.py",
                   "quire/cluster/serving/async_engine.py", "quire/cluster/tools/planner.py"]:
        assert module in names, f"{module} missing from the wheel"
    assert not any(n.startswith(("worker/", "cluster/", "tests/", "quire/__init__.py")) for n in names)
    # The shipped default model travels as package data, every file of it (none before the
    # training run has written it; then at least the checkpoint's required files).
    shipped = ROOT / "cluster" / "assets" / "default-model"
    files = sorted(p.name for p in shipped.iterdir() if p.is_file()) if shipped.is_dir() else []
    if (shipped / "training.json").is_file():
        assert set(REQUIRED_FILES) <= set(files)
    for name in files:
        assert f"quire/cluster/assets/default-model/{name}" in names, f"default model's {name} missing from the wheel"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "quire = quire.cluster.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    # The installed tree imports on its own, without the source checkout on the path.
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    probe = "import quire.cluster, quire.worker.worker, quire.protos.step, quire.kernels; print(quire.cluster.__file__)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith(str(target))
