"""deploy/ray/*-autoscale.yaml: a CPU head (router, frontends) that takes no replica and a GPU
worker type that Ray's autoscaler grows and shrinks with quire's replicas: node bounds that
hold --min-replicas and --max-replicas, a serve command that starts at once, and workers that
wait for the NVIDIA driver only where there is a GPU and fetch the checkpoint before they
join. test_deploy_ray.py runs the checks every Ray YAML gets on them too.

Nothing here starts a cluster, builds an image or uses the network; the shell commands
the files run are executed only with stub `ray`/`python`/`quire` programs.
"""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess

import pytest

from deploy_files import (
    AUTOSCALE_GPU_YAMLS,
    BASH,
    DP,
    REPLICA_BOUNDS,
    TP,
    check_a100_node,
    head_node_type,
    load_ray_yaml,
    parse_serve,
    quire_serve_args,
    replica_bounds_check,
    serve_command,
    serve_parser,
    stub_calls,
    validate_like_ray_up,
    wait_for,
    write_stubs,
)


@pytest.mark.parametrize("name", AUTOSCALE_GPU_YAMLS)
def test_autoscale_head_node_type_is_cpu_only_and_takes_no_replica(name):
    config = load_ray_yaml(name)
    head = head_node_type(config)
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
    check_a100_node(name, worker)
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
