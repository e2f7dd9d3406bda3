"""deploy/ray/*.yaml: the Ray cluster launcher configs, every one of them (the autoscaling
files' own checks are in test_deploy_autoscale.py).

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
"""
from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import threading
import time

import jsonschema
import pytest

from deploy_files import (
    AUTOSCALE_GPU_YAMLS,
    BASH,
    DP,
    GPU_YAMLS,
    LOCAL_YAMLS,
    MULTI_NODE_GPU_YAMLS,
    RAY_YAMLS,
    SINGLE_NODE_GPU_YAMLS,
    TP,
    all_commands,
    check_a100_node,
    fake_ray_env,
    head_node_type,
    load_ray_yaml,
    parse_serve,
    run_head_setup,
    serve_parser,
    stub_calls,
    validate_like_ray_up,
    wait_for,
)


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


MUTATIONS = {
    "misspelled top-level key": lambda c: _rename(c, "head_start_ray_commands", "head_start_ray_command"),
    "unknown top-level key": lambda c: c.update(max_worker=0),
    "misspelled auth key": lambda c: c["auth"].update(ssh_usr="ubuntu"),
    "commands not a list": lambda c: c.update(setup_commands="pip install quire"),
    "provider without type": lambda c: c["provider"].pop("type"),
}
NODE_TYPE_MUTATIONS = {
    "node type without resources": lambda c: _rename(head_node_type(c), "resources", "resource"),
    "unknown node type key": lambda c: head_node_type(c).update(min_worker=0),
    "fractional GPU count": lambda c: head_node_type(c)["resources"].update(GPU=0.5),
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
    home, out, env, serve = run_head_setup(config, tmp_path)
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


@pytest.mark.parametrize("name", SINGLE_NODE_GPU_YAMLS)
def test_gpu_yamls_request_four_a100_80gb(name):
    config = load_ray_yaml(name)
    assert config["max_workers"] == 0 and list(config["available_node_types"]) == [config["head_node_type"]]
    node = head_node_type(config)
    assert node["resources"]["GPU"] >= TP[name] == 4
    check_a100_node(name, node)


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
    assert worker["node_config"] == head_node_type(config)["node_config"]  # the same machine twice
    for node in (head_node_type(config), worker):
        check_a100_node(name, node)
        # STRICT_PACK: a replica's ranks share a node, so every node holds whole replicas.
        assert node["resources"]["GPU"] % TP[name] == 0
    gpus = head_node_type(config)["resources"]["GPU"] + worker["resources"]["GPU"]
    assert gpus == DP[name] * TP[name]  # every GPU serves, none is left over
    # The worker joins the head's Ray; the head's autoscaler needs the cloud's SDK to create it.
    assert any(re.search(r"ray start --address=\$RAY_HEAD_IP:6379", c) for c in config["worker_start_ray_commands"])
    sdk = "google-api-python-client" if name.startswith("gcp") else "boto3"
    assert any(sdk in c for c in config["head_setup_commands"])


@pytest.mark.parametrize("name", MULTI_NODE_GPU_YAMLS)
def test_multi_node_serve_waits_for_every_gpu_in_the_ray_cluster(name, tmp_path):
    config = load_ray_yaml(name)
    needed = DP[name] * TP[name]
    home, out, base, serve = run_head_setup(config, tmp_path)

    # The head's GPUs, then still the head's, then the worker's too: quire starts after the third look.
    head_gpus = head_node_type(config)["resources"]["GPU"]
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


@pytest.mark.parametrize("name", LOCAL_YAMLS)
def test_local_yaml_is_cpu_only_with_placeholders(name):
    config = load_ray_yaml(name)
    assert config["provider"]["type"] == "local"
    assert "REPLACE_ME" in config["provider"]["head_ip"]
    assert all("REPLACE_ME" in ip for ip in config["provider"]["worker_ips"])
    assert not any("triton" in c or "cu12" in c for c in all_commands(config))
