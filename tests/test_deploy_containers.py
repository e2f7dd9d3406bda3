"""deploy/docker and deploy/kubernetes: the Dockerfile (and its .dockerignore) and the KubeRay
manifests.

Nothing here starts a cluster, builds an image or uses the network; the shell commands
the files run are executed only with stub `ray`/`python`/`quire` programs.

The KubeRay manifests (deploy/kubernetes/*.yaml) are not checked against KubeRay's CRD
schema (not installed here); their fields are checked one by one, and the RayCluster goes
through the config Ray's autoscaler derives from it on KubeRay
(ray.autoscaler._private.kuberay.autoscaling_config: node types, resources and bounds from
the groups) and Ray's validate_config.
"""
from __future__ import annotations

import ast
import copy
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy_files import (
    BASH,
    DEPLOY,
    ROOT,
    parse_serve,
    replica_bounds_check,
    serve_parser,
    stub_calls,
    write_stubs,
)


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
