"""What the tests of deploy/ share (test_deploy_ray.py, test_deploy_autoscale.py,
test_deploy_containers.py): the files and the sizes each serves with, Ray's own validation
as `ray up` runs it, quire's `serve` parser over a file's command, and stub programs that
record their calls.

Nothing here starts a cluster, builds an image or uses the network; the shell commands
the files run are executed only with stub `ray`/`python`/`quire` programs.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RAY_DIR = DEPLOY / "ray"
SINGLE_NODE_GPU_YAMLS = ["gcp-a100x4.yaml", "aws-a100x4.yaml"]
# Head + one worker node, data-parallel replicas across both; the serve command waits for every GPU.
MULTI_NODE_GPU_YAMLS = ["gcp-a100x4-dp2.yaml", "aws-a100x4-dp4.yaml"]
# A CPU head (router, frontends) and a GPU worker type that Ray's autoscaler grows and shrinks
# with quire's replicas (--min-replicas/--max-replicas); no wait for GPUs.
AUTOSCALE_GPU_YAMLS = ["gcp-a100x4-autoscale.yaml", "aws-a100x4-autoscale.yaml"]
GPU_YAMLS = SINGLE_NODE_GPU_YAMLS + MULTI_NODE_GPU_YAMLS + AUTOSCALE_GPU_YAMLS
LOCAL_YAMLS = ["local-cpu.yaml", "local-cpu-dp2.yaml"]
RAY_YAMLS = GPU_YAMLS + LOCAL_YAMLS
# The tensor-parallel size (ranks per replica) and the data-parallel size (replicas) each file serves with.
# For the autoscaling files DP is the replicas quire starts with (--data-parallel-size).
TP = {"gcp-a100x4.yaml": 4, "aws-a100x4.yaml": 4, "gcp-a100x4-dp2.yaml": 4, "aws-a100x4-dp4.yaml": 4,
      "gcp-a100x4-autoscale.yaml": 4, "aws-a100x4-autoscale.yaml": 4,
      "local-cpu.yaml": 2, "local-cpu-dp2.yaml": 1}
DP = {"gcp-a100x4.yaml": 1, "aws-a100x4.yaml": 1, "gcp-a100x4-dp2.yaml": 2, "aws-a100x4-dp4.yaml": 4,
      "gcp-a100x4-autoscale.yaml": 1, "aws-a100x4-autoscale.yaml": 2,
      "local-cpu.yaml": 1, "local-cpu-dp2.yaml": 2}
# The autoscaling bounds (--min-replicas, --max-replicas) each autoscaling file serves with.
REPLICA_BOUNDS = {"gcp-a100x4-autoscale.yaml": (1, 4), "aws-a100x4-autoscale.yaml": (2, 8)}
BASH = "/bin/bash"


def load_ray_yaml(name: str) -> dict:
    return yaml.safe_load((RAY_DIR / name).read_text())


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def validate_like_ray_up(config: dict) -> dict:
    """Schema on the raw file, then Ray's own prepare_config + validate_config; the prepared config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(config, ray_schema())
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def serve_parser():
    from quire.cluster.cli import build_parser

    return build_parser()


def quire_serve_args(command: str) -> list[str]:
    """The arguments after `quire serve` in a shell command, up to the first redirection or `&`."""
    tokens = shlex.split(command, comments=True)
    start = next(i for i in range(len(tokens) - 1) if tokens[i] == "quire" and tokens[i + 1] == "serve") + 2
    args = []
    for token in tokens[start:]:
        if token[0] in "<>&|;)" or re.match(r"\d?>", token):  # `)`: the end of a subshell
            break
        args.append(token)
    return args


def parse_serve(command: str):
    return serve_parser().parse_args(["serve", *quire_serve_args(command)])


def all_commands(config: dict) -> list[str]:
    keys = ["initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands"]
    return [command for key in keys for command in config.get(key) or []]


def write_stubs(directory: Path, names: list[str], out: Path) -> Path:
    """Executables that record their argv (NUL-separated) and pid in `out`, then exit 0."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        stub = directory / name
        # One line of NUL-terminated arguments per call; the pid last, so it marks a complete record.
        stub.write_text("#!/bin/sh\n"
                        f'{{ printf "%s\\0" "$@"; printf "\\n"; }} >> "{out}/{name}.args"\n'
                        f'echo $$ >> "{out}/{name}.pid"\n')
        stub.chmod(0o755)
    return directory


def stub_calls(out: Path, name: str) -> list[list[str]]:
    path = out / f"{name}.args"
    if not path.exists():
        return []
    return [line.split("\0")[:-1] for line in path.read_text().split("\n") if line]


def wait_for(path: Path, timeout: float = 10.0) -> str:
    """The file's text once it has some (it is written by a process in the background)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text()
        time.sleep(0.02)
    raise AssertionError(f"{path.name} never appeared")


def fake_ray_env(tmp_path: Path, env: dict, gpu_counts: list[int]) -> dict:
    """`env` plus a `python` whose `import ray` is a fake cluster: each `cluster_resources()`
    call takes the next of `gpu_counts` (the last one stays), and a `sleep` that returns at once."""
    package = tmp_path / "fake_ray" / "ray"
    package.mkdir(parents=True, exist_ok=True)
    counts = tmp_path / "fake_ray" / "gpu_counts.json"
    counts.write_text(json.dumps(gpu_counts))
    (package / "__init__.py").write_text(
        "import json, os\n"
        "def init(**kwargs):\n"
        "    assert kwargs.get('address') == 'auto', kwargs\n"
        "def cluster_resources():\n"
        "    path = os.environ['FAKE_RAY_GPU_COUNTS']\n"
        "    counts = json.loads(open(path).read())\n"
        "    gpus = counts.pop(0) if len(counts) > 1 else counts[0]\n"
        "    open(path, 'w').write(json.dumps(counts))\n"
        "    return {'CPU': 96.0, 'GPU': float(gpus)}\n")
    bin_dir = tmp_path / "fake_ray" / "bin"
    bin_dir.mkdir(exist_ok=True)
    # -S: no site-packages (the fake `ray` is on PYTHONPATH), so a few hundred runs take seconds.
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    (bin_dir / "python").chmod(0o755)
    (bin_dir / "sleep").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sleep").chmod(0o755)
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}", "PYTHONPATH": str(package.parent),
            "FAKE_RAY_GPU_COUNTS": str(counts)}


def replica_bounds_check(serve, gpus_per_node: int, min_nodes: int, max_nodes: int, cpus_per_node: int) -> None:
    """A GPU node type sized in whole replicas, with node bounds that hold --min-replicas and
    --max-replicas: ceil(replicas x TP / GPUs per node) nodes, and exactly the CPUs Ray needs
    for the replicas a node holds (1 per replica actor + 1 per rank, as RayReplicaFactory
    counts them), so a replica's actor cannot land on a node its ranks do not fit on."""
    tp = serve.tensor_parallel_size
    assert serve.min_replicas is not None and serve.max_replicas is not None
    assert 1 <= serve.min_replicas < serve.max_replicas  # elastic
    assert gpus_per_node % tp == 0  # STRICT_PACK: whole replicas per node
    assert min_nodes == -(-serve.min_replicas * tp // gpus_per_node) >= 1
    assert max_nodes == -(-serve.max_replicas * tp // gpus_per_node)
    assert cpus_per_node == gpus_per_node // tp * (1 + tp)


def serve_command(config: dict) -> str:
    (command,) = [c for c in config["head_start_ray_commands"] if "quire serve" in c]
    return command


def head_node_type(config: dict) -> dict:
    """The head's entry in `available_node_types`."""
    return config["available_node_types"][config["head_node_type"]]


def check_a100_node(name: str, node: dict) -> None:
    """A node type of A100 80GB GPUs as each cloud's files size it (GCP: 4 per node; AWS: 8)."""
    node_config = node["node_config"]
    if name.startswith("gcp"):
        assert node["resources"]["GPU"] == 4
        assert node_config["machineType"] == "a2-ultragpu-4g"
        assert node_config["guestAccelerators"] == [{"acceleratorType": "nvidia-a100-80gb", "acceleratorCount": 4}]
        assert {"onHostMaintenance": "TERMINATE"} in node_config["scheduling"]
        assert node_config["disks"][0]["initializeParams"]["diskSizeGb"] >= 300
        assert "deeplearning-platform-release" in node_config["disks"][0]["initializeParams"]["sourceImage"]
    else:
        # p4de.24xlarge: 8 A100 80GB, quire takes 4 of them per replica.
        assert node_config["InstanceType"] == "p4de.24xlarge" and node["resources"]["GPU"] == 8
        assert node_config["ImageId"].startswith("ami-REPLACE_ME")
        assert node_config["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] >= 300


def run_head_setup(config: dict, tmp_path: Path) -> tuple[Path, Path, dict, str]:
    """Runs the file's first setup command (it writes the env file into a fresh HOME) with a stub
    `quire` on PATH; (home, stub record directory, that environment, the head's serve command)."""
    home, out = tmp_path / "home", tmp_path / "out"
    home.mkdir()
    out.mkdir()
    stubs = write_stubs(tmp_path / "bin", ["quire"], out)
    env = {"HOME": str(home), "PATH": f"{stubs}:{os.environ['PATH']}"}
    subprocess.run([BASH, "-c", f"({config['setup_commands'][0]})"], env=env, check=True)
    serve = next(c for c in config["head_start_ray_commands"] if "quire serve" in c)
    return home, out, env, serve
