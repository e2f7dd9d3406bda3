"""deploy/: the Ray cluster launcher configs, the Dockerfile and the KubeRay manifests.

Nothing here starts a cluster, builds an image or uses the network; the shell commands
the files run are executed only with stub `ray`/`python`/`quire` programs.

Ray cluster configs (deploy/ray/*.yaml) are checked the way `ray up` checks them before it
touches a cloud (ray.autoscaler._private.commands._bootstrap_config):

1. `prepare_config`: merges the provider's shipped ray/autoscaler/<provider>/defaults.yaml
   under the file (top-level keys; a key the file sets replaces the default), turns a
   `local` config into its single node type from head_ip/worker_ips, prepends
   `setup_commands` to the head/worker setup commands, checks the docker section and
   fills each node type's min/max workers. In this Ray it only reads those YAML files, so
   it needs no cloud SDK and runs here as is (no hand-made merge of the defaults).
2. the provider's `fillout_available_node_types_resources` (AWS asks EC2 what an instance
   type has): skipped, the files give `resources` themselves, which the schema requires.
3. `validate_config`: jsonschema against ray/autoscaler/ray-schema.json (unknown keys
   at the top level, in `auth`, `docker` or a node type fail; resources must be integers)
   plus its cross-field checks (head_node_type among available_node_types, min_workers
   within max_workers, cluster_synced_files present).
4. the provider's `bootstrap_config` (key pairs, IAM roles, subnets and firewalls through
   boto3 / google-api-python-client and your credentials): not run for AWS and GCP,
   neither SDK is installed here. For `local` it is the identity, and steps 1-4 run as one
   through `_bootstrap_config` itself.

The raw file is also validated against the schema before defaults are merged, so a bad
key cannot hide behind a default. The schema leaves `provider` open and `node_config`
free-form (instance-API fields are checked by the cloud at launch), and it sees commands
only as strings: their shell syntax is checked with `bash -n`, and the ones that start
quire are run with stubs and their `quire serve` flags parsed by quire's own CLI parser.

The KubeRay manifests (deploy/kubernetes/*.yaml) are not checked against KubeRay's CRD
schema (not installed here); their fields are checked one by one, and the RayCluster goes
through the config Ray's autoscaler derives from it on KubeRay
(ray.autoscaler._private.kuberay.autoscaling_config: node types, resources and bounds from
the groups) and Ray's validate_config.
"""
from __future__ import annotations

import copy
import json
import ast
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import pytest
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


# --------------------------------------------------------------------------- Ray cluster YAMLs


@pytest.mark.parametrize("name", RAY_YAMLS)
def test_ray_yaml_passes_ray_up_validation(name):
    prepared = validate_like_ray_up(load_ray_yaml(name))
    assert prepared["head_node_type"] in prepared["available_node_types"]
    assert prepared["setup_commands"] == load_ray_yaml(name)["setup_commands"]


@pytest.mark.parametrize("name", LOCAL_YAMLS)
def test_local_yaml_bootstraps_like_ray_up(name):
    """For the `local` provider the whole pre-SSH path of `ray up` runs offline."""
    from ray.autoscaler._private.commands import _bootstrap_config

    config = load_ray_yaml(name)
    resolved = _bootstrap_config(copy.deepcopy(config), no_config_cache=True)
    assert resolved["provider"]["head_ip"] == config["provider"]["head_ip"]
    assert resolved["max_workers"] == len(config["provider"]["worker_ips"])


def _rename(config, old, new):
    config[new] = config.pop(old)


def _node_type(config):
    return config["available_node_types"][config["head_node_type"]]


MUTATIONS = {
    "misspelled top-level key": lambda c: _rename(c, "head_start_ray_commands", "head_start_ray_command"),
    "unknown top-level key": lambda c: c.update(max_worker=0),
    "misspelled auth key": lambda c: c["auth"].update(ssh_usr="ubuntu"),
    "commands not a list": lambda c: c.update(setup_commands="pip install quire"),
    "provider without type": lambda c: c["provider"].pop("type"),
}
NODE_TYPE_MUTATIONS = {
    "node type without resources": lambda c: _rename(_node_type(c), "resources", "resource"),
    "unknown node type key": lambda c: _node_type(c).update(min_worker=0),
    "fractional GPU count": lambda c: _node_type(c)["resources"].update(GPU=0.5),
    "head_node_type not a node type": lambda c: c.update(head_node_type="quire-a100x4"),
}


@pytest.mark.parametrize("name,mutation", [(n, m) for n in RAY_YAMLS for m in MUTATIONS]
                         + [(n, m) for n in GPU_YAMLS for m in NODE_TYPE_MUTATIONS])
def test_ray_yaml_typo_fails_validation(name, mutation):
    config = load_ray_yaml(name)
    validate_like_ray_up(copy.deepcopy(config))  # the file itself is fine
    (MUTATIONS | NODE_TYPE_MUTATIONS)[mutation](config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_like_ray_up(config)


@pytest.mark.parametrize("name", RAY_YAMLS)
def test_ray_yaml_commands_are_valid_bash(name):
    for command in all_commands(load_ray_yaml(name)):
        # `ray up` runs each as `bash --login -c -i '... && (COMMAND)'`.
        result = subprocess.run([BASH, "-n", "-c", f"({command})"], capture_output=True, text=True, check=False)
        assert result.returncode == 0, f"{command!r}: {result.stderr}"


@pytest.mark.parametrize("name", RAY_YAMLS)
def test_head_starts_ray_then_quire_serve(name):
    commands = load_ray_yaml(name)["head_start_ray_commands"]
    ray_start = next(i for i, c in enumerate(commands) if "ray start" in c)
    assert "--head" in commands[ray_start] and "--autoscaling-config=~/ray_bootstrap_config.yaml" in commands[ray_start]
    serve = [i for i, c in enumerate(commands) if "quire serve" in c]
    assert len(serve) == 1 and serve[0] > ray_start
    command = commands[serve[0]]
    args = parse_serve(command)
    assert args.tensor_parallel_size == TP[name]
    assert args.data_parallel_size == DP[name]
    if DP[name] > 1:
        assert args.routing_policy == "cache_aware"
    assert (args.host, args.port, args.grpc_port) == ("0.0.0.0", 8000, 50051)
    assert args.ray_address == "auto"  # the cluster `ray start --head` just started
    assert args.model == ("$QUIRE_MODEL" if name in GPU_YAMLS else None)  # CPU: the shipped default model
    assert re.search(r"nohup quire serve .*> ~/quire-serve\.log 2>&1 < /dev/null &", command)


@pytest.mark.parametrize("name", RAY_YAMLS)
def test_setup_installs_torch_then_quire_with_its_extras(name):
    setup = load_ray_yaml(name)["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if re.search(r"pip install torch\b", c))
    quire_at = next(i for i, c in enumerate(setup) if "quire[" in c)
    assert torch_at < quire_at
    extras = "ray,triton" if name in GPU_YAMLS else "ray"
    assert f'"quire[{extras}] @ git+$QUIRE_REPO_URL@$QUIRE_REF"' in setup[quire_at]
    assert '"ray[default]==$RAY_VERSION"' in setup[quire_at]


@pytest.mark.parametrize("name", RAY_YAMLS)
def test_every_variable_comes_from_the_env_file_and_the_placeholder_is_refused(name, tmp_path):
    config = load_ray_yaml(name)
    env = {"HOME": str(tmp_path), "PATH": os.environ["PATH"]}
    subprocess.run([BASH, "-c", f"({config['setup_commands'][0]})"], env=env, check=True)
    defined = set(re.findall(r"export (\w+)=", (tmp_path / "quire.env").read_text()))
    used = {v for c in all_commands(config) for v in re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", c)}
    assert used - defined <= {"HOME", "PATH", "RAY_HEAD_IP"}  # RAY_HEAD_IP: set by `ray up`
    # The repository URL is a placeholder until the user sets it; setup stops right there.
    guard = next(c for c in config["setup_commands"] if "REPLACE_ME" in c and "exit 1" in c)
    refused = subprocess.run([BASH, "-c", f"({guard})"], env=env, capture_output=True, text=True, check=False)
    assert refused.returncode == 1 and "QUIRE_REPO_URL" in refused.stderr
    env_file = tmp_path / "quire.env"
    env_file.write_text(env_file.read_text().replace("REPLACE_ME_QUIRE_GIT_URL", "https://git.invalid/quire.git"))
    subprocess.run([BASH, "-c", f"({guard})"], env=env, check=True)


@pytest.mark.parametrize("name", RAY_YAMLS)
def test_head_commands_record_quires_pid_and_stop_it_on_the_next_ray_up(name, tmp_path):
    config = load_ray_yaml(name)
    home, out = tmp_path / "home", tmp_path / "out"
    home.mkdir()
    out.mkdir()
    stubs = write_stubs(tmp_path / "bin", ["quire"], out)
    env = {"HOME": str(home), "PATH": f"{stubs}:{os.environ['PATH']}"}
    subprocess.run([BASH, "-c", f"({config['setup_commands'][0]})"], env=env, check=True)
    serve = next(c for c in config["head_start_ray_commands"] if "quire serve" in c)
    # A multi-node file waits for its GPUs first: here a fake Ray that has them all at once.
    env_serve = fake_ray_env(tmp_path, env, [DP[name] * TP[name]])
    subprocess.run([BASH, "-c", f"({serve})"], env=env_serve, check=True, capture_output=True)
    # nohup execs quire, so `$!` is quire's own pid.
    assert wait_for(home / "quire-serve.pid").strip() == wait_for(out / "quire.pid").strip()
    (call,) = stub_calls(out, "quire")
    assert call[:1] == ["serve"] and call[call.index("--tensor-parallel-size") + 1] == str(TP[name])
    if DP[name] > 1 or name in AUTOSCALE_GPU_YAMLS:  # an elastic deployment names its first size
        assert call[call.index("--data-parallel-size") + 1] == str(DP[name])
    else:  # one replica: the flag's default, as before data parallelism
        assert "--data-parallel-size" not in call
    if name in GPU_YAMLS:  # $QUIRE_MODEL came from ~/quire.env
        assert call[call.index("--model") + 1] == "/data/models/Meta-Llama-3-70B-Instruct"
    assert (home / "quire-serve.log").exists()

    # The next `ray up` first stops the quire that pid file names (and waits for it to go).
    running = subprocess.Popen(["sleep", "60"])
    # Reap it the moment it dies, as init does for the real quire: a zombie still answers `kill -0`.
    reaper = threading.Thread(target=running.wait, daemon=True)
    reaper.start()
    try:
        (home / "quire-serve.pid").write_text(f"{running.pid}\n")
        subprocess.run([BASH, "-c", f"({config['head_start_ray_commands'][0]})"], env=env, check=True, timeout=30)
        reaper.join(timeout=10)
        assert running.returncode == -signal.SIGTERM
        assert not (home / "quire-serve.pid").exists()
    finally:
        if running.returncode is None:
            running.kill()
            reaper.join(timeout=10)


def _check_a100_node(name: str, node: dict) -> None:
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


@pytest.mark.parametrize("name", SINGLE_NODE_GPU_YAMLS)
def test_gpu_yamls_request_four_a100_80gb(name):
    config = load_ray_yaml(name)
    assert config["max_workers"] == 0 and list(config["available_node_types"]) == [config["head_node_type"]]
    node = _node_type(config)
    assert node["resources"]["GPU"] >= TP[name] == 4
    _check_a100_node(name, node)


@pytest.mark.parametrize("name", MULTI_NODE_GPU_YAMLS)
def test_multi_node_gpu_yamls_have_one_worker_node_and_room_for_every_replica(name):
    config = load_ray_yaml(name)
    prepared = validate_like_ray_up(copy.deepcopy(config))
    head_type = config["head_node_type"]
    workers = {k: v for k, v in config["available_node_types"].items() if k != head_type}
    (worker,) = workers.values()
    # The autoscaler starts exactly one worker with the cluster and never adds or removes one.
    assert worker["min_workers"] == worker["max_workers"] == config["max_workers"] == 1
    assert prepared["available_node_types"][head_type]["max_workers"] == 0
    assert worker["node_config"] == _node_type(config)["node_config"]  # the same machine twice
    for node in (_node_type(config), worker):
        _check_a100_node(name, node)
        # STRICT_PACK: a replica's ranks share a node, so every node holds whole replicas.
        assert node["resources"]["GPU"] % TP[name] == 0
    gpus = _node_type(config)["resources"]["GPU"] + worker["resources"]["GPU"]
    assert gpus == DP[name] * TP[name]  # every GPU serves, none is left over
    # The worker joins the head's Ray; the head's autoscaler needs the cloud's SDK to create it.
    assert any(re.search(r"ray start --address=\$RAY_HEAD_IP:6379", c) for c in config["worker_start_ray_commands"])
    sdk = "google-api-python-client" if name.startswith("gcp") else "boto3"
    assert any(sdk in c for c in config["head_setup_commands"])


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


@pytest.mark.parametrize("name", MULTI_NODE_GPU_YAMLS)
def test_multi_node_serve_waits_for_every_gpu_in_the_ray_cluster(name, tmp_path):
    config = load_ray_yaml(name)
    needed = DP[name] * TP[name]
    home, out = tmp_path / "home", tmp_path / "out"
    home.mkdir()
    out.mkdir()
    stubs = write_stubs(tmp_path / "bin", ["quire"], out)
    base = {"HOME": str(home), "PATH": f"{stubs}:{os.environ['PATH']}"}
    subprocess.run([BASH, "-c", f"({config['setup_commands'][0]})"], env=base, check=True)
    serve = next(c for c in config["head_start_ray_commands"] if "quire serve" in c)

    # The head's GPUs, then still the head's, then the worker's too: quire starts after the third look.
    head_gpus = _node_type(config)["resources"]["GPU"]
    env = fake_ray_env(tmp_path / "joins", base, [head_gpus, head_gpus, needed])
    subprocess.run([BASH, "-c", f"({serve})"], env=env, check=True, capture_output=True, timeout=30)
    assert wait_for(home / "quire-serve.pid").strip() == wait_for(out / "quire.pid").strip()
    (call,) = stub_calls(out, "quire")
    args = serve_parser().parse_args(call)
    assert (args.data_parallel_size, args.tensor_parallel_size) == (DP[name], TP[name])
    log = (home / "quire-serve.log").read_text()
    assert log.count(f"of the {needed} GPUs") == 3, log
    assert f"has {head_gpus} of the {needed} GPUs" in log and f"has {needed} of the {needed} GPUs" in log

    # The worker never joins: it gives up (with a message in the log) instead of starting quire.
    (out / "quire.args").unlink()
    (out / "quire.pid").unlink()
    (home / "quire-serve.pid").unlink()
    env_file = home / "quire.env"
    assert 'export QUIRE_GPU_WAIT_MINUTES="45"' in env_file.read_text()
    env_file.write_text(env_file.read_text().replace('QUIRE_GPU_WAIT_MINUTES="45"', 'QUIRE_GPU_WAIT_MINUTES="2"'))
    env = fake_ray_env(tmp_path / "never", base, [head_gpus])
    subprocess.run([BASH, "-c", f"({serve})"], env=env, check=True, capture_output=True, timeout=30)
    deadline = time.monotonic() + 30
    while "gave up" not in (home / "quire-serve.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = (home / "quire-serve.log").read_text()
    assert f"gave up after 2 minutes without {needed} GPUs" in log, log[-2000:]
    assert log.count(f"has {head_gpus} of the {needed} GPUs") == 2 * 6  # every 10 s for 2 minutes
    assert wait_for(home / "quire-serve.pid")
    assert stub_calls(out, "quire") == []


# --------------------------------------------------------------------------- autoscaling Ray YAMLs


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


@pytest.mark.parametrize("name", AUTOSCALE_GPU_YAMLS)
def test_autoscale_head_node_type_is_cpu_only_and_takes_no_replica(name):
    config = load_ray_yaml(name)
    head = _node_type(config)
    # Ray schedules nothing of quire's on the head: no GPUs, and no CPUs for a replica's actor.
    assert head["resources"] == {"CPU": 0, "GPU": 0}
    node_config = head["node_config"]
    if name.startswith("gcp"):
        assert "guestAccelerators" not in node_config
        assert not node_config["machineType"].startswith(("a2-", "a3-", "a4-", "g2-"))
        image = node_config["disks"][0]["initializeParams"]["sourceImage"]
        worker_image = _worker_type(config)["node_config"]["disks"][0]["initializeParams"]["sourceImage"]
    else:
        assert not node_config["InstanceType"].startswith(("p", "g", "inf", "trn"))
        image, worker_image = node_config["ImageId"], _worker_type(config)["node_config"]["ImageId"]
    assert image == worker_image  # one OS and Python on every node, as Ray needs
    (ray_start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--num-cpus=0" in ray_start and "--num-gpus=0" in ray_start
    sdk = "google-api-python-client" if name.startswith("gcp") else "boto3"
    assert any(sdk in c for c in config["head_setup_commands"])  # the autoscaler creates the workers


def _worker_type(config: dict) -> dict:
    (worker,) = [v for k, v in config["available_node_types"].items() if k != config["head_node_type"]]
    return worker


@pytest.mark.parametrize("name", AUTOSCALE_GPU_YAMLS)
def test_autoscale_worker_bounds_match_the_replica_bounds(name):
    config = load_ray_yaml(name)
    prepared = validate_like_ray_up(copy.deepcopy(config))
    serve = parse_serve(serve_command(config))
    assert (serve.min_replicas, serve.max_replicas) == REPLICA_BOUNDS[name]
    assert serve.tensor_parallel_size == TP[name]
    if {"--data-parallel-size", "-dp"} & set(quire_serve_args(serve_command(config))):
        assert serve.min_replicas <= serve.data_parallel_size <= serve.max_replicas
    worker = _worker_type(config)
    _check_a100_node(name, worker)
    resources = worker["resources"]
    replica_bounds_check(serve, resources["GPU"], worker["min_workers"], worker["max_workers"], resources["CPU"])
    assert config["max_workers"] == worker["max_workers"]  # the cluster-wide cap does not cut the type's
    head_type = config["head_node_type"]
    assert prepared["available_node_types"][head_type]["max_workers"] == 0
    # The worker joins the head's Ray.
    assert any(re.search(r"ray start --address=\$RAY_HEAD_IP:6379", c) for c in config["worker_start_ray_commands"])
    # Scaling: upscaling at least as fast as the router asks (one replica at a time), and an
    # idle node kept a while (a new one takes 10-20 minutes) but not for long.
    assert config["upscaling_speed"] >= 1
    assert 5 <= config["idle_timeout_minutes"] <= 30


@pytest.mark.parametrize("name", AUTOSCALE_GPU_YAMLS)
def test_autoscale_serve_starts_at_once_without_waiting_for_gpus(name, tmp_path):
    config = load_ray_yaml(name)
    command = serve_command(config)
    assert "cluster_resources" not in command and "until " not in command
    assert "QUIRE_GPU_WAIT_MINUTES" not in json.dumps(config)
    home, out = tmp_path / "home", tmp_path / "out"
    home.mkdir()
    out.mkdir()
    stubs = write_stubs(tmp_path / "bin", ["quire", "python"], out)
    env = {"HOME": str(home), "PATH": f"{stubs}:{os.environ['PATH']}"}
    subprocess.run([BASH, "-c", f"({config['setup_commands'][0]})"], env=env, check=True)
    subprocess.run([BASH, "-c", f"({command})"], env=env, check=True, capture_output=True, timeout=30)
    assert wait_for(home / "quire-serve.pid").strip() == wait_for(out / "quire.pid").strip()
    (call,) = stub_calls(out, "quire")
    args = serve_parser().parse_args(call)
    assert (args.min_replicas, args.max_replicas, args.data_parallel_size) == (*REPLICA_BOUNDS[name], DP[name])
    assert args.drain_grace_seconds > 0 and args.routing_policy == "cache_aware"
    assert stub_calls(out, "python") == []


@pytest.mark.parametrize("name", AUTOSCALE_GPU_YAMLS)
@pytest.mark.parametrize("has_gpu", [True, False])
def test_autoscale_nodes_wait_for_the_nvidia_driver_only_where_there_is_a_gpu(name, has_gpu, tmp_path):
    (command,) = load_ray_yaml(name)["initialization_commands"]
    assert command.count("/sys/bus/pci/devices/*/vendor") == 1
    devices = tmp_path / "devices"
    for address, vendor in [("0000:00:01.0", "0x8086"), ("0000:00:04.0", "0x10de" if has_gpu else "0x1af4")]:
        (devices / address).mkdir(parents=True)
        (devices / address / "vendor").write_text(vendor + "\n")
    out = tmp_path / "out"
    out.mkdir()
    stubs = write_stubs(tmp_path / "bin", ["nvidia-smi"], out)
    env = {"PATH": f"{stubs}:{os.environ['PATH']}"}
    command = command.replace("/sys/bus/pci/devices", str(devices))
    subprocess.run([BASH, "-c", f"({command})"], env=env, check=True, timeout=30)
    assert len(stub_calls(out, "nvidia-smi")) == (1 if has_gpu else 0)


def sync_excludes(cli: str, call: list[str], relative: str) -> bool:
    """Whether a `gcloud storage rsync` (--exclude: a Python regex searched in the relative
    path) or `aws s3 sync` (--exclude: a glob on the relative path) call skips `relative`."""
    import fnmatch

    patterns = [a.split("=", 1)[1] for a in call if a.startswith("--exclude=")]
    patterns += [call[i + 1] for i, a in enumerate(call[:-1]) if a == "--exclude"]
    if cli == "gcloud":
        return any(re.search(p, relative) for p in patterns)
    return any(fnmatch.fnmatchcase(relative, p) for p in patterns)


@pytest.mark.parametrize("name", AUTOSCALE_GPU_YAMLS)
def test_autoscale_every_worker_downloads_the_checkpoint_before_it_joins(name, tmp_path):
    config = load_ray_yaml(name)
    cli, scheme = ("gcloud", "gs://") if name.startswith("gcp") else ("aws", "s3://")
    home, out = tmp_path / "home", tmp_path / "out"
    home.mkdir()
    out.mkdir()
    stubs = write_stubs(tmp_path / "bin", [cli], out)
    env = {"HOME": str(home), "PATH": f"{stubs}:{os.environ['PATH']}"}
    subprocess.run([BASH, "-c", f"({config['setup_commands'][0]})"], env=env, check=True)
    env_file = home / "quire.env"
    model = tmp_path / "models" / "llama"
    uri = f"{scheme}REPLACE_ME_BUCKET/models/Meta-Llama-3-70B-Instruct"
    assert uri in env_file.read_text()
    # The bucket is a placeholder until the user sets it (or empties it); setup stops there.
    (guard,) = [c for c in config["setup_commands"] if "QUIRE_MODEL_URI" in c and "exit 1" in c]
    refused = subprocess.run([BASH, "-c", f"({guard})"], env=env, capture_output=True, text=True, check=False)
    assert refused.returncode == 1 and "QUIRE_MODEL_URI" in refused.stderr
    env_file.write_text(env_file.read_text().replace(uri, f"{scheme}bucket/llama")
                        .replace("/data/models/Meta-Llama-3-70B-Instruct", str(model)))
    subprocess.run([BASH, "-c", f"({guard})"], env=env, check=True)

    def run_all(commands):
        results = [subprocess.run([BASH, "-c", f"({c})"], env=env, capture_output=True, text=True, check=False)
                   for c in commands]
        return [r.returncode for r in results], "".join(r.stderr for r in results)

    head_sync = [c for c in config["head_setup_commands"] if "QUIRE_MODEL_URI" in c]
    worker_setup = config["worker_setup_commands"]
    # The head: config and tokenizer only, no weight shards.
    assert run_all(head_sync)[0] == [0]
    (head_call,) = stub_calls(out, cli)
    assert head_call[-2:] == [f"{scheme}bucket/llama", str(model)]
    for weights in ["model-00001-of-00030.safetensors", "pytorch_model-00001-of-00002.bin", "consolidated.00.pth"]:
        assert sync_excludes(cli, head_call, weights), weights
    for needed in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "model.safetensors.index.json", "tokenizer.model"]:
        assert not sync_excludes(cli, head_call, needed), needed
    (out / f"{cli}.args").unlink()
    # A worker: everything, then its setup stops unless the checkpoint is there (the stub downloads nothing).
    codes, stderr = run_all(worker_setup)
    assert codes == [0, 1] and f"no checkpoint at {model}" in stderr
    (worker_call,) = stub_calls(out, cli)
    assert worker_call[-2:] == [f"{scheme}bucket/llama", str(model)] and "safetensors" not in " ".join(worker_call)
    expected = ["storage", "rsync", "--recursive"] if cli == "gcloud" else ["s3", "sync", "--only-show-errors"]
    assert worker_call[:3] == expected
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    assert run_all(worker_setup)[0] == [0, 0]
    # Without a bucket (a checkpoint baked into the image) nothing is downloaded.
    (out / f"{cli}.args").unlink()
    env_file.write_text(env_file.read_text().replace(f"{scheme}bucket/llama", ""))
    assert run_all(head_sync + worker_setup)[0] == [0, 0, 0]
    assert stub_calls(out, cli) == []
    # The workers may read the bucket: GCP with a service account of this project, AWS with an instance profile.
    node_config = _worker_type(config)["node_config"]
    if cli == "gcloud":
        (account,) = node_config["serviceAccounts"]
        assert account["email"].split("@")[1] == f"{config['provider']['project_id']}.iam.gserviceaccount.com"
        assert "https://www.googleapis.com/auth/cloud-platform" in account["scopes"]
    else:
        assert re.fullmatch(r"arn:aws:iam::\S+:instance-profile/\S+", node_config["IamInstanceProfile"]["Arn"])


@pytest.mark.parametrize("name", LOCAL_YAMLS)
def test_local_yaml_is_cpu_only_with_placeholders(name):
    config = load_ray_yaml(name)
    assert config["provider"]["type"] == "local"
    assert "REPLACE_ME" in config["provider"]["head_ip"]
    assert all("REPLACE_ME" in ip for ip in config["provider"]["worker_ips"])
    assert not any("triton" in c or "cu12" in c for c in all_commands(config))


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


DOCKERFILE = DEPLOY / "docker" / "Dockerfile"


def test_dockerfile_base_image_is_cuda_with_a_pinned_tag():
    froms = [args for keyword, args in dockerfile_instructions(DOCKERFILE) if keyword == "FROM"]
    assert len(froms) == 1
    image = froms[0].split()[0]
    assert image.startswith(("nvidia/cuda:", "pytorch/pytorch:")), image
    _, _, tag = image.partition(":")
    assert tag and tag != "latest" and re.match(r"\d+\.\d+", tag), image


def test_dockerfile_installs_cuda_torch_then_copies_and_installs_quire():
    instructions = dockerfile_instructions(DOCKERFILE)
    runs = [(i, args) for i, (keyword, args) in enumerate(instructions) if keyword == "RUN"]
    torch_at = next(i for i, args in runs if re.search(r"pip install \"?torch==\S+", args))
    copy_at = next(i for i, (keyword, args) in enumerate(instructions)
                   if keyword == "COPY" and args.split()[0] == ".")
    quire_at = next(i for i, args in runs if 'pip install' in args and '".[ray,triton]"' in args)
    assert torch_at < copy_at < quire_at
    quire_run = instructions[quire_at][1]
    assert f"cd {instructions[copy_at][1].split()[1]}" in quire_run  # installs what was copied
    arg_names = {args.split("=")[0] for keyword, args in instructions if keyword == "ARG"}
    assert {"TORCH_VERSION", "TORCH_INDEX_URL"} <= arg_names


def test_dockerfile_runs_quire_serve_as_non_root_on_both_ports_with_a_healthcheck():
    instructions = dockerfile_instructions(DOCKERFILE)
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    last_user = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "USER")
    assert all(keyword != "RUN" for keyword, _ in instructions[last_user:])
    exposed = {int(p.split("/")[0]) for keyword, args in instructions if keyword == "EXPOSE" for p in args.split()}
    assert {8000, 50051} <= exposed
    (entrypoint,) = [json.loads(args) for keyword, args in instructions if keyword == "ENTRYPOINT"]
    assert entrypoint == ["quire"]
    (cmd,) = [json.loads(args) for keyword, args in instructions if keyword == "CMD"]
    served = serve_parser().parse_args(cmd)
    assert (served.command, served.host, served.port, served.grpc_port) == ("serve", "0.0.0.0", 8000, 50051)
    (healthcheck,) = [args for keyword, args in instructions if keyword == "HEALTHCHECK"]
    probe = healthcheck.split("CMD", 1)[1]
    assert re.search(rf"https?://(127\.0\.0\.1|localhost):{served.port}/health\b", probe), probe
    assert "curl -f" in probe or "curl -fsS" in probe  # a 503 must fail the check


def dockerignore_rules(path: Path) -> list[tuple[re.Pattern, bool]]:
    """Docker's .dockerignore patterns as (regex, is_exception), in file order."""
    rules = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!")).lstrip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((re.compile(regex + r"\Z"), exception))
    return rules


def excluded(relative: str, rules) -> bool:
    """Like Docker: a pattern matching a path or any of its parent folders decides; the last one wins."""
    parts, result = relative.split("/"), False
    for regex, exception in rules:
        if any(regex.match("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            result = not exception
    return result


def pyproject_readme_and_package_dirs() -> tuple[str, list[str]]:
    """`project.readme` (no tomllib on Python 3.10) and the package folders setup.py ships (`TOP_LEVEL`)."""
    text = (ROOT / "pyproject.toml").read_text()
    readme = re.search(r'^readme\s*=\s*"([^"]+)"', text, re.MULTILINE).group(1)
    setup = ast.parse((ROOT / "setup.py").read_text())
    folders = next(ast.literal_eval(node.value) for node in setup.body
                   if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "TOP_LEVEL")
    assert folders
    return readme, folders


def test_dockerignore_sits_where_buildkit_reads_it_and_keeps_what_pip_install_needs():
    # Docker reads .dockerignore only at the context root (the repository root here);
    # BuildKit first looks for <Dockerfile>.dockerignore next to the Dockerfile.
    ignore = DOCKERFILE.with_name(DOCKERFILE.name + ".dockerignore")
    assert ignore.is_file() and not (DOCKERFILE.parent / ".dockerignore").exists()
    rules = dockerignore_rules(ignore)
    readme, package_dirs = pyproject_readme_and_package_dirs()
    needed = ["pyproject.toml", "setup.py", readme]
    for folder in package_dirs:
        needed += [str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts]
    kept_out = [path for path in needed if excluded(path, rules)]
    assert not kept_out, f"the build context would lack {kept_out}"
    for path in [".venv/bin/python", "build/lib/x.py", "quire.egg-info/PKG-INFO", ".git/HEAD",
                 "tests/test_engine.py", "cluster/__pycache__/engine.cpython-311.pyc", "deploy/docker/Dockerfile"]:
        assert excluded(path, rules), path


# --------------------------------------------------------------------------- KubeRay manifests

K8S = DEPLOY / "kubernetes" / "quire-raycluster.yaml"  # a fixed number of worker pods
K8S_AUTOSCALE = DEPLOY / "kubernetes" / "quire-raycluster-autoscale.yaml"  # Ray's autoscaler sizes the worker group
K8S_MANIFESTS = [K8S, K8S_AUTOSCALE]
k8s_manifests = pytest.mark.parametrize("manifest", K8S_MANIFESTS, ids=lambda path: path.name)


def k8s_documents(manifest: Path = K8S) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(manifest.read_text()) if doc]


def raycluster(manifest: Path = K8S) -> dict:
    (cluster,) = [d for d in k8s_documents(manifest) if d["kind"] == "RayCluster"]
    return cluster


def quire_container(cluster: dict) -> dict:
    (container,) = [c for c in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
                    if "quire serve" in " ".join(c.get("command", []) + c.get("args", []))]
    return container


def container_script(container: dict) -> str:
    assert container["command"] == ["/bin/bash", "-c", "--"]
    (script,) = container["args"]
    return script


@k8s_manifests
def test_raycluster_has_the_fields_kuberay_requires(manifest):
    cluster = raycluster(manifest)
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", cluster["metadata"]["name"])
    head = cluster["spec"]["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    groups = [head] + cluster["spec"]["workerGroupSpecs"]
    for group in groups:  # KubeRay's CRD: map[string]string
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in group["rayStartParams"].items())
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c["name"] and c["image"] for c in containers)
        for volume in group["template"]["spec"].get("volumes", []):
            assert any(m["name"] == volume["name"] for c in containers for m in c.get("volumeMounts", []))
    (worker,) = cluster["spec"]["workerGroupSpecs"]
    assert worker["groupName"] and isinstance(worker["replicas"], int)
    assert worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]


@k8s_manifests
def test_raycluster_serves_tp4_on_a_four_gpu_worker(manifest):
    cluster = raycluster(manifest)
    args = parse_serve(container_script(quire_container(cluster)))
    assert args.tensor_parallel_size == 4
    assert (args.host, args.port, args.grpc_port) == ("0.0.0.0", 8000, 50051)
    assert args.ray_address in {"auto", "127.0.0.1:6379"}
    (worker,) = cluster["spec"]["workerGroupSpecs"]
    ray_container = worker["template"]["spec"]["containers"][0]  # KubeRay's Ray container is the first
    limits = ray_container["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == args.tensor_parallel_size == 4
    # No Ray tasks or actors on the head: the ranks go to the GPU worker.
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    # The head pod is Ready only after quire loaded, which needs the worker, which reaches
    # the GCS through the head Service: that Service must publish not-ready addresses.
    assert cluster["spec"]["headGroupSpec"]["headService"]["spec"]["publishNotReadyAddresses"] is True


@k8s_manifests
def test_quire_container_probes_health_on_the_served_port(manifest):
    cluster = raycluster(manifest)
    container = quire_container(cluster)
    port = parse_serve(container_script(container)).port
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ["readinessProbe", "livenessProbe", "startupProbe"]:
        http = container[probe]["httpGet"]
        assert http["path"] == "/health", probe
        assert named.get(http["port"], http["port"]) == port, probe
    # A slow model load is the startup probe's business, not the liveness probe's.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 20 * 60


@k8s_manifests
def test_service_exposes_http_and_grpc_of_the_head_pod(manifest):
    cluster = raycluster(manifest)
    (service,) = [d for d in k8s_documents(manifest) if d["kind"] == "Service"]
    assert service["apiVersion"] == "v1"
    # KubeRay labels the head pod with these.
    assert service["spec"]["selector"] == {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head"}
    container = quire_container(cluster)
    args = parse_serve(container_script(container))
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    targets = {p["port"]: named.get(p.get("targetPort", p["port"]), p.get("targetPort", p["port"]))
               for p in service["spec"]["ports"]}
    assert targets == {8000: args.port, 50051: args.grpc_port}


@k8s_manifests
def test_every_ray_container_runs_kuberays_ray_start_under_the_overwrite_annotation(manifest):
    cluster = raycluster(manifest)
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    groups = [cluster["spec"]["headGroupSpec"]] + cluster["spec"]["workerGroupSpecs"]
    for group in groups:
        script = container_script(group["template"]["spec"]["containers"][0])
        assert "$KUBERAY_GEN_RAY_START_CMD" in script or "${KUBERAY_GEN_RAY_START_CMD" in script
        subprocess.run([BASH, "-n", "-c", script], check=True)


GENERATED = ("ray start --head  --block  --dashboard-agent-listen-port=52365  --dashboard-host=0.0.0.0  "
             "--metrics-export-port=8080  --num-cpus=0  --resources='{\"quire\": 1}' ")


@k8s_manifests
def test_head_script_starts_ray_in_the_background_then_execs_quire(manifest, tmp_path):
    cluster = raycluster(manifest)
    container = quire_container(cluster)
    out = tmp_path / "out"
    out.mkdir()
    stubs = write_stubs(tmp_path / "bin", ["ray", "python", "quire"], out)
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "HOME": str(tmp_path), "KUBERAY_GEN_RAY_START_CMD": GENERATED,
           "RAY_ADDRESS": "127.0.0.1:6379", **{e["name"]: e["value"] for e in container.get("env", [])}}
    result = subprocess.run([BASH, "-c", "--", container_script(container)], env=env, capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    (ray_call,) = stub_calls(out, "ray")
    assert ray_call[:2] == ["start", "--head"] and "--block" not in ray_call
    assert '--resources={"quire": 1}' in ray_call  # KubeRay's quoting survives
    # The fixed cluster waits for its GPUs (the stub says they are there at once); the
    # autoscaling one starts at once: its replicas wait for the pods Ray's autoscaler adds.
    assert len(stub_calls(out, "python")) == (0 if manifest == K8S_AUTOSCALE else 1)
    (quire_call,) = stub_calls(out, "quire")
    args = serve_parser().parse_args(quire_call)
    assert args.model == container["env"][0]["value"] and args.tensor_parallel_size == 4

    # Without KubeRay's generated command (KubeRay < 1.1) it stops instead of waiting forever.
    env.pop("KUBERAY_GEN_RAY_START_CMD")
    stopped = subprocess.run([BASH, "-c", "--", container_script(container)], env=env,
                             capture_output=True, text=True, timeout=30, check=False)
    assert stopped.returncode == 1 and "KubeRay >= 1.1" in stopped.stderr


@k8s_manifests
def test_worker_script_runs_kuberays_ray_start_with_block(manifest, tmp_path):
    (worker,) = raycluster(manifest)["spec"]["workerGroupSpecs"]
    out = tmp_path / "out"
    out.mkdir()
    stubs = write_stubs(tmp_path / "bin", ["ray"], out)
    generated = "ray start  --address=quire-head-svc.default.svc.cluster.local:6379  --block  --num-gpus=4"
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "KUBERAY_GEN_RAY_START_CMD": generated}
    script = container_script(worker["template"]["spec"]["containers"][0])
    subprocess.run([BASH, "-c", "--", script], env=env, check=True, timeout=30)
    (call,) = stub_calls(out, "ray")
    assert call == generated.split()[1:]


def kuberay_autoscaling_config(cluster: dict) -> dict:
    """The autoscaling config Ray's autoscaler derives from the RayCluster on KubeRay (its
    own translation: node types from the groups, resources from rayStartParams or the Ray
    container's limits, bounds from min/maxReplicas, autoscalerOptions), through Ray's
    validate_config."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
    from ray.autoscaler._private.util import validate_config

    cluster = copy.deepcopy(cluster)
    cluster["metadata"].setdefault("namespace", "default")  # the API server fills it in
    config = _derive_autoscaling_config_from_ray_cr(cluster)
    validate_config(config)
    return config


@k8s_manifests
def test_raycluster_passes_the_kuberay_autoscalers_own_translation(manifest):
    cluster = raycluster(manifest)
    config = kuberay_autoscaling_config(cluster)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["CPU"] == 0 and head["resources"].get("GPU", 0) == 0
    (worker,) = cluster["spec"]["workerGroupSpecs"]
    node = config["available_node_types"][worker["groupName"]]
    assert node["resources"]["GPU"] == 4
    assert (node["min_workers"], node["max_workers"]) == (worker["minReplicas"], worker["maxReplicas"])
    args = parse_serve(container_script(quire_container(cluster)))
    if manifest == K8S:  # fixed: as many pods as replicas, all of them kept
        assert worker["minReplicas"] == worker["replicas"] == worker["maxReplicas"] == args.data_parallel_size


def test_autoscaling_raycluster_lets_rays_autoscaler_follow_the_replica_bounds():
    cluster = raycluster(K8S_AUTOSCALE)
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    options = spec["autoscalerOptions"]
    assert options["upscalingMode"] in {"Default", "Aggressive", "Conservative"}
    assert isinstance(options["idleTimeoutSeconds"], int) and 300 <= options["idleTimeoutSeconds"] <= 1800
    config = kuberay_autoscaling_config(cluster)
    assert config["idle_timeout_minutes"] == options["idleTimeoutSeconds"] / 60
    # The head: Ray's head, the autoscaler and the router; no GPU and no CPU for a replica.
    head_params = spec["headGroupSpec"]["rayStartParams"]
    assert head_params["num-cpus"] == "0" and head_params["num-gpus"] == "0"
    head_container = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_container["resources"].get("limits", {})
    # The router's bounds, and the worker group's in pods of 4 GPUs.
    serve = parse_serve(container_script(quire_container(cluster)))
    assert (serve.min_replicas, serve.max_replicas, serve.tensor_parallel_size) == (1, 4, 4)
    assert serve.min_replicas <= serve.data_parallel_size <= serve.max_replicas
    (worker,) = spec["workerGroupSpecs"]
    node = config["available_node_types"][worker["groupName"]]
    replica_bounds_check(serve, node["resources"]["GPU"], worker["minReplicas"], worker["maxReplicas"],
                         node["resources"]["CPU"])
    assert worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]
    assert int(worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) == 4
    # No wait for GPUs before quire starts.
    assert "cluster_resources" not in container_script(quire_container(cluster))
    # Next to the fixed manifest in one namespace: its own names.
    fixed = raycluster(K8S)
    assert cluster["metadata"]["name"] != fixed["metadata"]["name"]
    names = {d["metadata"]["name"] for d in k8s_documents(K8S_AUTOSCALE) if d["kind"] == "Service"}
    assert not names & {d["metadata"]["name"] for d in k8s_documents(K8S) if d["kind"] == "Service"}
