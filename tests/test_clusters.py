"""Cluster configs in clusters/: parse, pass Ray's own launcher validation, keep the invariants that matter.

Nothing here launches anything or touches the network: the launcher configs go through Ray's schema and
config preparation (the steps `ray up` runs before it calls a cloud API), the KubeRay manifests are
checked against the field names of KubeRay's ray.io/v1 types, and the RayJob entrypoint is run through
the same shell quoting as KubeRay's submitter and the job's real argument parser.
"""

import argparse
import copy
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
LAUNCHER = {"aws": CLUSTERS / "aws.yaml", "gcp": CLUSTERS / "gcp.yaml"}
RAYCLUSTER = CLUSTERS / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTERS / "kuberay" / "rayjob.yaml"
DOCKERFILE = CLUSTERS / "Dockerfile"
RAY_VERSION = ray.__version__
PYPROJECT = (ROOT / "pyproject.toml").read_text()  # tomllib is 3.11+, the package supports 3.10
PACKAGE_VERSION = re.search(r'^version\s*=\s*"([^"]+)"', PYPROJECT, re.M)[1]
WHEEL = f"raynoisy-{PACKAGE_VERSION}-py3-none-any.whl"
IMAGE_RE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py3\d+-gpu$")

# Field names of KubeRay's ray.io/v1 types (ray-operator/apis/ray/v1/raycluster_types.go, rayjob_types.go,
# KubeRay 1.5/1.6): a misspelt field is silently dropped or rejected by the API server, so catch it here.
RAYCLUSTER_SPEC_FIELDS = {
    "suspend",
    "managedBy",
    "autoscalerOptions",
    "headServiceAnnotations",
    "enableInTreeAutoscaling",
    "gcsFaultToleranceOptions",
    "headGroupSpec",
    "rayVersion",
    "workerGroupSpecs",
    "authOptions",
}
AUTOSCALER_FIELDS = {
    "resources",
    "image",
    "imagePullPolicy",
    "securityContext",
    "idleTimeoutSeconds",
    "upscalingMode",
    "version",
    "env",
    "envFrom",
    "volumeMounts",
}
HEAD_GROUP_FIELDS = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP_FIELDS = {
    "suspend",
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "idleTimeoutSeconds",
    "rayStartParams",
    "template",
    "scaleStrategy",
    "numOfHosts",
}
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds",
    "backoffLimit",
    "rayClusterSpec",
    "submitterPodTemplate",
    "metadata",
    "clusterSelector",
    "submitterConfig",
    "managedBy",
    "deletionPolicy",
    "deletionStrategy",
    "entrypoint",
    "runtimeEnvYAML",
    "jobId",
    "submissionMode",
    "entrypointResources",
    "entrypointNumCpus",
    "entrypointNumGpus",
    "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes",
    "suspend",
    "schedule",
}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_every_yaml_parses():
    files = sorted(CLUSTERS.rglob("*.y*ml"))
    assert {LAUNCHER["aws"], LAUNCHER["gcp"], RAYCLUSTER, RAYJOB} <= set(files)
    for path in files:
        docs = list(yaml.safe_load_all(path.read_text()))
        assert docs and all(isinstance(d, dict) for d in docs), path


# ---------------------------------------------------------------------------------------------------------
# Ray cluster launcher (aws.yaml, gcp.yaml)


def _gpu_types(name: str, cfg: dict) -> dict:
    def is_gpu(t: dict) -> bool:
        if t.get("resources", {}).get("GPU", 0) > 0:
            return True
        instance = t["node_config"].get("InstanceType", "")  # AWS: counts come from the instance type
        return re.match(r"^(g\d|p\d)", instance) is not None

    head = cfg["head_node_type"]
    return {k: t for k, t in cfg["available_node_types"].items() if k != head and is_gpu(t)}


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_config_passes_ray_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(load(LAUNCHER[name])))
    validate_config(prepared)
    assert prepared["provider"]["type"] == name


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_head_trains_nothing(name):
    cfg = load(LAUNCHER[name])
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must advertise 0 CPUs: no Train/Data work there"
    assert head["resources"].get("GPU", 0) == 0


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_gpu_workers_autoscale_from_zero(name):
    cfg = load(LAUNCHER[name])
    gpus = _gpu_types(name, cfg)
    assert gpus, "no GPU worker type"
    assert max(t["max_workers"] for t in gpus.values()) >= 1
    assert all(t.get("min_workers", 0) == 0 for t in gpus.values()), "idle GPUs should scale to zero"
    workers = [t for k, t in cfg["available_node_types"].items() if k != cfg["head_node_type"]]
    assert sum(t["max_workers"] for t in workers) <= cfg["max_workers"]
    assert cfg["idle_timeout_minutes"] > 0
    cpu_only = [
        t for k, t in cfg["available_node_types"].items() if k != cfg["head_node_type"] and k not in gpus
    ]
    assert cpu_only and max(t["max_workers"] for t in cpu_only) >= 1, "no CPU worker type for Ray Data decode"


def test_aws_gpu_workers_are_spot():
    cfg = load(LAUNCHER["aws"])
    for gpu_type in _gpu_types("aws", cfg).values():
        assert gpu_type["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
        assert "IamInstanceProfile" in gpu_type["node_config"], "workers write checkpoints to S3"


def test_gcp_gpu_workers_are_preemptible_with_drivers():
    cfg = load(LAUNCHER["gcp"])
    for name, gpu_type in _gpu_types("gcp", cfg).items():
        node = gpu_type["node_config"]
        # A mapping, as the Compute API expects (ray-project/ray#46248); GPU VMs cannot live-migrate.
        assert isinstance(node["scheduling"], dict), name
        assert node["scheduling"]["preemptible"] is True
        assert node["scheduling"]["onHostMaintenance"] == "TERMINATE"
        items = {i["key"]: i["value"] for i in node["metadata"]["items"]}
        assert items.get("install-nvidia-driver") == "True", name
        assert gpu_type["resources"]["GPU"] >= 1
        assert any("nvidia-smi" in c for c in gpu_type.get("initialization_commands", []))
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert "initialization_commands" not in head, "the GPU driver wait would time out on the head"


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_image_and_pins_match_installed_ray(name):
    cfg = load(LAUNCHER[name])
    match = IMAGE_RE.match(cfg["docker"]["image"])
    assert match, cfg["docker"]["image"]
    assert match["ray"] == RAY_VERSION
    assert not any(k in cfg["docker"] for k in ("head_image", "worker_image"))
    pins = re.findall(r"ray\[[a-z,]+\]==([\d.]+)", " ".join(cfg["setup_commands"]))
    assert pins == [RAY_VERSION]


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_installs_this_package_with_gpu_extra(name):
    cfg = load(LAUNCHER[name])
    extras = re.search(r"^\[project\.optional-dependencies\]\n(?:.*\n)*?gpu\s*=", PYPROJECT, re.M)
    assert extras, "pyproject.toml has no `gpu` extra"
    wheels = {remote: local for remote, local in cfg["file_mounts"].items() if remote.endswith(".whl")}
    assert len(wheels) == 1
    ((remote, local),) = wheels.items()
    assert local == f"build/wheels/{WHEEL}", "the wheel name must carry pyproject.toml's version"
    assert Path(remote).name == WHEEL
    setup = " ".join(cfg["setup_commands"])
    assert f'"{remote}[gpu]"' in setup
    assert "--force-reinstall --no-deps " + remote in setup, "a rebuilt wheel keeps its version"
    assert "pip uninstall -y -q faiss-cpu" in setup, "faiss-cpu and faiss-gpu-cu12 both provide `faiss`"


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_token_auth_and_shm(name):
    cfg = load(LAUNCHER[name])
    token_mounts = [r for r, local in cfg["file_mounts"].items() if local == "~/.ray/auth_token"]
    assert len(token_mounts) == 1
    setup = " ".join(cfg["setup_commands"])
    assert "RAY_AUTH_MODE=token" in setup and f"RAY_AUTH_TOKEN_PATH={token_mounts[0]}" in setup
    # The launcher sizes /dev/shm for the container itself unless a run option sets --shm-size.
    docker = cfg["docker"]
    assert not docker.get("disable_shm_size_detection", False)
    assert not any("--shm-size" in opt for opt in docker.get("run_options", []))


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_user_values_are_marked(name):
    lines = LAUNCHER[name].read_text().splitlines()
    for key in ("region:", "availability_zone:") + (("project_id:",) if name == "gcp" else ()):
        line = next(line for line in lines if line.strip().startswith(key))
        assert "EDIT" in line, line


# ---------------------------------------------------------------------------------------------------------
# KubeRay (raycluster.yaml, rayjob.yaml) and the image they run


def _cluster_specs() -> dict[str, dict]:
    return {"raycluster": load(RAYCLUSTER)["spec"], "rayjob": load(RAYJOB)["spec"]["rayClusterSpec"]}


def _pod_specs(spec: dict):
    yield "head", spec["headGroupSpec"]["template"]["spec"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]


def _dockerfile() -> tuple[str, str]:
    text = DOCKERFILE.read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M)[1]
    workdir = re.search(r"^WORKDIR\s+(\S+)", text, re.M)[1]
    return base, workdir


def test_kuberay_kinds_and_field_names():
    cluster, job = load(RAYCLUSTER), load(RAYJOB)
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert set(job["spec"]) <= RAYJOB_SPEC_FIELDS
    for spec in _cluster_specs().values():
        assert set(spec) <= RAYCLUSTER_SPEC_FIELDS
        assert set(spec["autoscalerOptions"]) <= AUTOSCALER_FIELDS
        assert set(spec["headGroupSpec"]) <= HEAD_GROUP_FIELDS
        for group in spec["workerGroupSpecs"]:
            assert set(group) <= WORKER_GROUP_FIELDS


@pytest.mark.parametrize("which", ["raycluster", "rayjob"])
def test_kuberay_versions_match_installed_ray(which):
    spec = _cluster_specs()[which]
    assert spec["rayVersion"] == RAY_VERSION
    base, _ = _dockerfile()
    assert IMAGE_RE.match(base)["ray"] == RAY_VERSION, "clusters/Dockerfile FROM must be the pinned Ray"
    images = {c["image"] for _, pod in _pod_specs(spec) for c in pod["containers"]}
    assert len(images) == 1, f"head and workers must run one image: {images}"
    tag = images.pop().rsplit(":", 1)[1]
    assert f"ray{RAY_VERSION}" in tag and tag.startswith(PACKAGE_VERSION)
    assert f"ray[default,train,tune,data]=={RAY_VERSION}" in DOCKERFILE.read_text()


@pytest.mark.parametrize("which", ["raycluster", "rayjob"])
def test_kuberay_autoscaling_gpu_cluster(which):
    spec = _cluster_specs()[which]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["version"] == "v2"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_env = {e["name"] for c in head["template"]["spec"]["containers"] for e in c.get("env", [])}
    assert "RAY_enable_autoscaler_v2" not in head_env, "KubeRay rejects it next to autoscalerOptions.version"
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if any(
            "nvidia.com/gpu" in c["resources"].get("limits", {}) for c in g["template"]["spec"]["containers"]
        )
    ]
    assert len(gpu_groups) == 1
    group = gpu_groups[0]
    assert group["minReplicas"] == 0 and group.get("replicas", 0) == 0
    assert group["maxReplicas"] >= 1
    pod = group["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    for container in pod["containers"]:
        # One whole GPU per pod = per Train worker; requests must equal limits for extended resources.
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["resources"]["requests"] == container["resources"]["limits"]


@pytest.mark.parametrize("which", ["raycluster", "rayjob"])
def test_kuberay_every_pod_has_memory_backed_shm(which):
    for name, pod in _pod_specs(_cluster_specs()[which]):
        volumes = pod["volumes"]
        memory_volumes = {v["name"] for v in volumes if v.get("emptyDir", {}).get("medium") == "Memory"}
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert mounts.get("/dev/shm") in memory_volumes, f"{which}/{name}: /dev/shm is 64 MB in a pod"


def test_rayjob_lifecycle_and_storage_env():
    spec = load(RAYJOB)["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    for key in ("RAYNOISY_STORAGE_PATH", "RAYNOISY_SHARD_ROOT"):
        assert re.match(r"^(s3|gs)://", env[key]), f"{key} must be shared storage: {env[key]}"


# ---------------------------------------------------------------------------------------------------------
# The commands themselves: the RayJob entrypoint and the README's submit commands parse and validate


def _job_parser(script: str) -> argparse.ArgumentParser:
    from raynoisy.cli import add_run_arguments

    parser = argparse.ArgumentParser()
    add_run_arguments(parser, dataset=Path(script).stem, method="ce")
    parser.set_defaults(output=f"runs/{Path(script).stem}")
    return parser


def _validate_job_command(argv: list[str], tmp_path: Path):
    """argv = ['python', 'jobs/X.py', ...]: the script exists and its flags/--set values validate.

    The cluster's image has internet or the weights cached; here a stand-in file in a temporary torch hub
    cache lets the pretrained-weights check pass (it checks that the file is there, not what it holds); the
    calling test points TORCH_HOME there.
    """
    from torchvision.models import ResNet18_Weights, ResNet34_Weights, ResNet50_Weights

    from raynoisy.cli import config_from_args

    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    for weights in (ResNet18_Weights, ResNet34_Weights, ResNet50_Weights):
        (cache / weights.DEFAULT.url.rsplit("/", 1)[-1]).touch()

    assert argv[0] == "python" and argv[1].startswith("jobs/"), argv
    assert (ROOT / argv[1]).is_file(), f"{argv[1]} does not exist"
    args = _job_parser(argv[1]).parse_args(argv[2:])
    if args.data_root is not None:  # lives on the cluster; validate the rest against a local stand-in
        args.data_root = str(tmp_path)
    cfg = config_from_args(args)
    assert cfg.scaling.gpus_per_worker >= 1 and float(cfg.scaling.gpus_per_worker).is_integer()
    assert cfg.run.name, "set run.name explicitly on clusters (see clusters/README.md)"
    for value in (cfg.run.storage_path, cfg.data.shard_root):
        assert value and re.match(r"^(s3|gs)://", value), value
    assert Path(cfg.run.output).is_absolute(), "--output is on the head: give an absolute path"
    return cfg


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_rayjob_entrypoint_survives_submitter_shell_and_validates(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    spec = load(RAYJOB)["spec"]
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    # KubeRay's submitter runs `... ray job submit ... -- <entrypoint> ; fi` through bash, with none of our
    # env vars: the words it passes on must still hold the unexpanded $RAYNOISY_* references.
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("RAYNOISY_")}
    words = subprocess.run(
        ["bash", "-c", "printf '%s\\0' " + spec["entrypoint"]],
        env=clean_env,
        capture_output=True,
        check=True,
        text=True,
    ).stdout.split("\0")[:-1]
    assert words[:2] == ["bash", "-c"] and len(words) == 3, words
    inner = words[2]
    assert "$RAYNOISY_STORAGE_PATH" in inner and "$RAYNOISY_SHARD_ROOT" in inner
    # On the head the inner bash expands them from the job's env_vars.
    for key, value in env.items():
        inner = inner.replace(f"${key}", value)
    cd, command = (part.strip() for part in inner.split("&&"))
    _, workdir = _dockerfile()
    assert cd == f"cd {workdir}", "the entrypoint must run from the image's copy of the repository"
    assert re.search(r"^COPY\s.*\bjobs\s+\./jobs\s*$", DOCKERFILE.read_text(), re.M), "image lacks jobs/"
    cfg = _validate_job_command(shlex.split(command), tmp_path)
    assert cfg.run.storage_path == env["RAYNOISY_STORAGE_PATH"]
    assert cfg.data.shard_root == env["RAYNOISY_SHARD_ROOT"]
    gpu_group = next(g for g in spec["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert cfg.scaling.workers <= gpu_group["maxReplicas"], "more Train workers than GPU pods"


def test_readme_submit_commands_validate(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    text = (CLUSTERS / "README.md").read_text().replace("\\\n", " ")
    commands = [
        line.split(" -- ", 1)[1].strip()
        for line in text.splitlines()
        if line.startswith("ray job submit") and "python jobs/" in line and "..." not in line
    ]
    assert commands, "no full `ray job submit` example in clusters/README.md"
    for command in commands:
        _validate_job_command(shlex.split(command), tmp_path)
