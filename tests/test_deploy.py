"""deploy/: the KubeRay manifest and the `ray up` config parse, have the paper study's shape
(configs/paper.yaml's trials fit on their workers, all at once), mount the same shared storage
everywhere, install the project, and set the settings the code reads, by the names it reads."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from importlib.util import find_spec
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from distill_core.config import load_config

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "deploy" / "kuberay-raycluster.yaml"
RAY_UP = ROOT / "deploy" / "ray-up.yaml"
MOUNT = "/mnt/kdbench"
SRC = f"{MOUNT}/src"
GCS_PORT = 6379
# What the files set, and where the code (or the library that reads it) reads it.
SETTINGS = ["KDBENCH_STORAGE_ROOT", "KDBENCH_PRESET", "RAY_ADDRESS", "MLFLOW_TRACKING_URI",
            "HF_TOKEN", "HF_HOME"]
READ_BY_KDBENCH = ["KDBENCH_STORAGE_ROOT", "KDBENCH_PRESET", "RAY_ADDRESS", "MLFLOW_TRACKING_URI"]
READ_BY_HUGGINGFACE_HUB = ["HF_TOKEN", "HF_HOME"]


# ---------------------------------------------------------------- shared helpers

@pytest.fixture(scope="module")
def paper():
    return load_config("paper")


def trials(cfg) -> int:
    return len(cfg.distill.groups) * len(cfg.seeds)


def cpus(quantity) -> float:
    """A Kubernetes CPU quantity ("64", "64000m", 64) in CPUs."""
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def fits(node: dict[str, float], ask: dict[str, float]) -> int:
    """How many of `ask` (kdbench's keys: cpu, gpu, custom) one node of `node` holds at once."""
    counts = []
    for key, amount in ask.items():
        if amount > 0:
            counts.append(int(node.get(key, 0) // amount))
    return min(counts) if counts else 0


def assert_settings(env: dict[str, str], where: str) -> None:
    """The values every node needs; HF_TOKEN is checked per file (secret / local environment)."""
    assert env.get("KDBENCH_STORAGE_ROOT") == MOUNT, where
    assert env.get("KDBENCH_PRESET") == "paper", where
    assert env.get("HF_HOME", "").startswith(MOUNT + "/"), f"{where}: HF_HOME off the shared mount"
    uri = urlsplit(env.get("MLFLOW_TRACKING_URI", ""))
    assert uri.scheme in ("http", "https") and uri.hostname and uri.port, \
        f"{where}: MLFLOW_TRACKING_URI must be an MLflow server (http://host:port), never sqlite"
    address = env.get("RAY_ADDRESS", "")
    assert "://" not in address and address.endswith(f":{GCS_PORT}"), \
        f"{where}: RAY_ADDRESS must be the head's GCS, host:{GCS_PORT}, got {address!r}"
    assert env.get("RAY_AUTH_MODE", "").lower() != "disabled", where


def source_text(package: str) -> str:
    return "\n".join(p.read_text() for p in sorted((ROOT / package).glob("*.py")))


def image_versions(image: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """rayproject/ray:2.60.0-py311-gpu -> ((2, 60, 0), (3, 11))."""
    match = re.fullmatch(r"rayproject/ray:(\d+)\.(\d+)\.(\d+)-py3(\d+)(-[a-z0-9]+)*", image)
    assert match, f"not a rayproject/ray:<version>-py3<minor> image: {image}"
    major, minor, patch, py = match.groups()[:4]
    return (int(major), int(minor), int(patch)), (3, int(py))


def assert_image_meets_pyproject(image: str) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ray_version, python = image_versions(image)
    python_floor = re.fullmatch(r">=\s*(\d+)\.(\d+)", project["requires-python"]).groups()
    assert python >= tuple(map(int, python_floor)), f"{image}: Python below {project['requires-python']}"
    ray_floor = next(re.search(r">=\s*([\d.]+)", d).group(1) for d in project["dependencies"]
                     if re.match(r"ray(\[|\s|>|=)", d))
    assert ray_version >= tuple(map(int, ray_floor.split("."))), f"{image}: Ray below {ray_floor}"


def shell_words(command: str) -> list[str]:
    """A shell command's words, those of quoted commands (`bash -c '...'`) included."""
    out = []
    for word in shlex.split(command):
        out += shell_words(word) if " " in word else [word]
    return out


def flag(command: str, name: str) -> str | None:
    """The value of `--name value` or `--name=value` in a shell command."""
    words = shell_words(command)
    for i, word in enumerate(words):
        if word == name and i + 1 < len(words):
            return words[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


# ---------------------------------------------------------------- KubeRay

@pytest.fixture(scope="module")
def manifest():
    text = KUBERAY.read_text()
    docs = [d for d in yaml.safe_load_all(text) if d]
    clusters = [d for d in docs if d.get("kind") == "RayCluster"]
    assert len(clusters) == 1, "one RayCluster in the manifest"
    return {"text": text, "docs": docs, "cluster": clusters[0]}


def pod_specs(cluster: dict) -> list[tuple[str, dict, dict]]:
    """(name, group spec, pod spec) of the head group and of every worker group."""
    spec = cluster["spec"]
    out = [("head", spec["headGroupSpec"], spec["headGroupSpec"]["template"]["spec"])]
    out += [(g["groupName"], g, g["template"]["spec"]) for g in spec.get("workerGroupSpecs", [])]
    return out


def node_resources(group: dict, pod: dict) -> dict[str, float]:
    """What `ray start` on one pod of the group offers, in kdbench's keys: KubeRay takes num-cpus
    and num-gpus from rayStartParams, else from the Ray container's limits."""
    params = group.get("rayStartParams") or {}
    limits = pod["containers"][0].get("resources", {}).get("limits", {})
    out = {"cpu": float(params["num-cpus"]) if "num-cpus" in params else cpus(limits.get("cpu", 0)),
           "gpu": float(params["num-gpus"]) if "num-gpus" in params
           else float(limits.get("nvidia.com/gpu", 0))}
    out.update(json.loads(params.get("resources", "{}").strip("'\"") or "{}"))
    return out


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def test_kuberay_is_a_raycluster_with_a_cpu_head_and_gpu_workers(manifest, paper):
    cluster = manifest["cluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"].get("dashboard-host") == "0.0.0.0"
    head_limits = head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits, "the head is CPU-only"
    assert node_resources(head, head["template"]["spec"])["cpu"] == 0, \
        "num-cpus 0 on the head: trials and actors belong on the GPU workers"
    workers = cluster["spec"]["workerGroupSpecs"]
    assert workers, "no worker group"
    gpus = 0.0
    for group in workers:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        pod = group["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        requests = pod["containers"][0]["resources"].get("requests", {})
        assert requests.get("nvidia.com/gpu", limits.get("nvidia.com/gpu")) == limits.get("nvidia.com/gpu")
        gpus += group["replicas"] * node_resources(group, pod)["gpu"]
    need = trials(paper) * paper.distill.resources_per_trial.get("gpu", 0)
    assert gpus >= need >= 28, f"{gpus} GPUs on the workers, the grid needs {need} at once"


def test_kuberay_trials_fit_on_the_workers(manifest, paper):
    ask = paper.distill.resources_per_trial
    groups = [(g, p) for name, g, p in pod_specs(manifest["cluster"]) if name != "head"]
    nodes = [(g["replicas"], node_resources(g, p)) for g, p in groups]
    for _, node in nodes:
        assert fits(node, ask) >= 1, f"a trial asks {ask}; a worker pod offers {node}"
        assert fits(node, paper.eval.resources_per_model) >= 1
    assert sum(n * fits(node, ask) for n, node in nodes) >= trials(paper), \
        f"{trials(paper)} trials at once of {ask} do not fit on {nodes}"
    actor_gpus = paper.cache.actors * paper.cache.num_gpus_per_actor
    assert sum(n * node["gpu"] for n, node in nodes) >= actor_gpus


def test_kuberay_every_pod_mounts_the_shared_volume_at_the_same_path(manifest):
    claims = {d["metadata"]["name"]: d for d in manifest["docs"]
              if d.get("kind") == "PersistentVolumeClaim"}
    pods = [(name, pod) for name, _, pod in pod_specs(manifest["cluster"])]
    pods += [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in manifest["docs"]
             if d.get("kind") == "Deployment"]
    claim_names = set()
    for name, pod in pods:
        volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                   if "persistentVolumeClaim" in v}
        assert volumes, f"{name}: no PersistentVolumeClaim volume"
        claim_names |= set(volumes.values())
        for container in pod["containers"]:
            paths = [m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in volumes]
            assert paths == [MOUNT], f"{name}/{container['name']} mounts the shared volume at {paths}"
    assert len(claim_names) == 1, f"one shared volume for all pods, got {claim_names}"
    (claim,) = claim_names
    if claims:  # the claim is in the file: it must be one every node can mount read-write
        assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"]


def test_kuberay_every_ray_container_has_the_environment(manifest):
    cluster = manifest["cluster"]
    name = cluster["metadata"]["name"]
    namespace = cluster["metadata"].get("namespace", "default")
    services = {d["metadata"]["name"]: d for d in manifest["docs"] if d.get("kind") == "Service"}
    deployments = [d for d in manifest["docs"] if d.get("kind") == "Deployment"]
    for group_name, _, pod in pod_specs(cluster):
        for container in pod["containers"]:
            where = f"{group_name}/{container['name']}"
            env = env_of(container)
            assert_settings(env, where)
            address = env["RAY_ADDRESS"]
            assert re.fullmatch(rf"{name}-head-svc(\.{namespace}(\.svc(\.cluster\.local)?)?)?:{GCS_PORT}",
                                address), f"{where}: RAY_ADDRESS {address} is not the head service"
            token = next(e for e in container["env"] if e["name"] == "HF_TOKEN")
            ref = token.get("valueFrom", {}).get("secretKeyRef", {})
            assert "value" not in token and ref.get("name") and ref.get("key"), \
                f"{where}: HF_TOKEN must come from a Secret"
            assert f"create secret generic {ref['name']}" in manifest["text"] and \
                f"--from-file={ref['key']}=" in manifest["text"], "the header creates that Secret"
            uri = urlsplit(env["MLFLOW_TRACKING_URI"])
            if uri.hostname.split(".")[0] in services:  # the server is in this file: it must be it
                service = services[uri.hostname.split(".")[0]]
                assert uri.hostname.split(".")[1:2] in ([], [service["metadata"]["namespace"]])
                assert uri.port in [p["port"] for p in service["spec"]["ports"]]
                server = next(d for d in deployments
                              if d["spec"]["selector"]["matchLabels"] == service["spec"]["selector"])
                command = " ".join(server["spec"]["template"]["spec"]["containers"][0]["args"])
                assert "mlflow server" in command and flag(command, "--host") == "0.0.0.0"
                assert not (flag(command, "--backend-store-uri") or "").startswith("sqlite:///") or \
                    flag(command, "--backend-store-uri").startswith(f"sqlite:///{MOUNT}/"), \
                    "the server's sqlite file must be on the shared volume (it outlives the pod)"
                assert "--serve-artifacts" in command, "trials log artifacts over HTTP"
                allowed = (flag(command, "--allowed-hosts") or "").split(",")
                assert any(fnmatch.fnmatch(uri.netloc, a) if "*" in a else uri.netloc == a
                           for a in allowed), \
                    f"MLflow 3 refuses Host {uri.netloc}: not in --allowed-hosts {allowed}"


def test_kuberay_installs_the_project_before_ray_starts(manifest):
    cluster = manifest["cluster"]
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true", \
        "without it KubeRay replaces the containers' command with its own `ray start`"
    images = set()
    for group_name, _, pod in pod_specs(cluster):
        container = pod["containers"][0]
        images.add(container["image"])
        script = "\n".join(container.get("command", []) + container.get("args", []))
        install = re.search(rf"pip install[^\n]*-e {re.escape(SRC)}(\s|$)", script)
        start = script.find("$KUBERAY_GEN_RAY_START_CMD")
        assert install and 0 <= install.start() < start, \
            f"{group_name}: `pip install -e {SRC}` must run before `ray start`"
        if group_name == "head":
            assert re.search(rf"git clone .*{re.escape(SRC)}", script), "the head fetches the project"
    assert len(images) == 1, f"head and workers run one image: {images}"
    (image,) = images
    assert_image_meets_pyproject(image)
    assert cluster["spec"]["rayVersion"] == ".".join(map(str, image_versions(image)[0]))


def test_kuberay_header_says_how_to_apply_and_launch(manifest):
    text = manifest["text"]
    assert "kubectl apply -f deploy/kuberay-raycluster.yaml" in text
    assert "kdbench demo --preset paper" in text and "cd /mnt/kdbench/src" in text
    assert "port-forward" in text


# ---------------------------------------------------------------- ray up

@pytest.fixture(scope="module")
def ray_up():
    text = RAY_UP.read_text()
    return {"text": text, "config": yaml.safe_load(text)}


def commands(config: dict, *keys: str) -> list[str]:
    return [c for key in keys for c in config.get(key) or []]


def exported(config: dict) -> dict[str, str]:
    """`export NAME=VALUE` lines the setup commands write (the nodes' env file)."""
    out = {}
    for command in commands(config, "setup_commands", "head_setup_commands", "worker_setup_commands"):
        for name, value in re.findall(r"^\s*export (\w+)=(.*)$", command, flags=re.M):
            out[name] = value.strip().strip('"').replace("\\$", "$")  # as the file holds it
    return out


def env_file(config: dict) -> str:
    """The file the setup commands write the exports to."""
    for command in commands(config, "setup_commands"):
        if match := re.search(r"cat > (\S+) <<", command):
            return match.group(1)
    raise AssertionError("no env file written by setup_commands")


def test_ray_up_matches_rays_schema(ray_up):
    import jsonschema

    schema = Path(find_spec("ray").submodule_search_locations[0]) / "autoscaler" / "ray-schema.json"
    jsonschema.validate(ray_up["config"], json.loads(schema.read_text()))


def test_ray_up_has_a_cpu_head_and_gpu_workers_the_trials_fit_on(ray_up, paper):
    config = ray_up["config"]
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0, \
        "the head runs the driver only"
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    ask = paper.distill.resources_per_trial
    at_once, gpus = 0, 0
    for name, worker in workers.items():
        node = {k.lower() if k in ("CPU", "GPU") else k: v for k, v in worker["resources"].items()}
        assert worker["min_workers"] == worker["max_workers"], f"{name}: a fixed size"
        assert fits(node, ask) >= 1, f"a trial asks {ask}; {name} offers {node}"
        assert fits(node, paper.eval.resources_per_model) >= 1
        at_once += worker["min_workers"] * fits(node, ask)
        gpus += worker["min_workers"] * node.get("gpu", 0)
    assert at_once >= trials(paper) >= 28, f"{at_once} trials at once, the grid has {trials(paper)}"
    assert gpus >= paper.cache.actors * paper.cache.num_gpus_per_actor
    assert config["max_workers"] >= sum(w["min_workers"] for w in workers.values())
    head_start = " ".join(commands(config, "head_start_ray_commands"))
    assert "--num-cpus=0" in head_start


def test_ray_up_mounts_the_shared_storage_on_every_node(ray_up):
    config = ray_up["config"]
    init = commands(config, "initialization_commands")
    assert any(re.search(rf"\bmount\b.* {re.escape(MOUNT)}$", c) for c in init), \
        f"no mount of the shared file system at {MOUNT} on the hosts"
    if config.get("docker", {}).get("image"):  # the commands run in the container: map it in
        options = " ".join(config["docker"].get("run_options", []))
        assert re.search(rf"(-v|--volume)[ =]{re.escape(MOUNT)}:{re.escape(MOUNT)}\b", options)
        assert_image_meets_pyproject(config["docker"]["image"])


def test_ray_up_every_ray_process_has_the_environment(ray_up):
    config = ray_up["config"]
    env = exported(config)
    assert_settings(env, "ray-up env file")
    assert "$head_ip" in env["RAY_ADDRESS"] or "$RAY_HEAD_IP" in env["RAY_ADDRESS"]
    # HF_TOKEN: from the machine running `ray up` (its file_mounts), never written in the file.
    token = env["HF_TOKEN"]
    assert not re.search(r"hf_[A-Za-z0-9]{20,}", ray_up["text"]), "a literal token in the config"
    match = re.fullmatch(r"\$\(cat (\S+)\)", token)
    assert match, f"HF_TOKEN={token}: read it from the file file_mounts brings"
    remote = match.group(1).replace("~", "/home/ray", 1)
    local = config["file_mounts"].get(remote)
    assert local and local.startswith("~"), f"{remote} is not file-mounted from the local machine"
    assert f'"$HF_TOKEN" > {local}' in ray_up["text"], "the header writes it from $HF_TOKEN"
    # The env reaches Ray's workers (the trials) through `ray start`, and the shells.
    path = env_file(config)
    starts = [c for c in commands(config, "head_start_ray_commands", "worker_start_ray_commands")
              if "ray start" in c]
    assert len(starts) == 2
    for command in starts:
        assert command.index(f"source {path}") < command.index("ray start"), command
    assert any(f"source {path}' >> ~/.bashrc" in c for c in commands(config, "setup_commands"))


def test_ray_up_ray_and_mlflow_listen_where_the_environment_points(ray_up):
    config = ray_up["config"]
    env = exported(config)
    head_start = commands(config, "head_start_ray_commands")
    ray_head = next(c for c in head_start if "ray start --head" in c)
    assert flag(ray_head, "--port") == str(GCS_PORT)
    worker = next(c for c in commands(config, "worker_start_ray_commands") if "ray start" in c)
    assert flag(worker, "--address") == f"$RAY_HEAD_IP:{GCS_PORT}"
    server = next(c for c in head_start if "mlflow server" in c)
    uri = urlsplit(env["MLFLOW_TRACKING_URI"].replace("$head_ip", "10.0.0.2"))
    assert flag(server, "--port") == str(uri.port) and flag(server, "--host") == "0.0.0.0"
    store = flag(server, "--backend-store-uri")
    assert store.startswith(f"sqlite:///{MOUNT}/") or store.startswith("postgresql")
    assert "--serve-artifacts" in server
    assert flag(server, "--allowed-hosts") is None, \
        "the default --allowed-hosts admits the head's private IP; a list must name it"


def test_ray_up_installs_the_project_from_shared_storage(ray_up):
    config = ray_up["config"]
    head = " && ".join(commands(config, "head_setup_commands"))
    worker = " && ".join(commands(config, "worker_setup_commands"))
    copy = re.search(rf"rsync -a (\S+)/ {re.escape(SRC)}/", head)
    assert copy, f"the head puts the project at {SRC}"
    assert copy.group(1).replace("~", "/home/ray", 1) in config["file_mounts"]
    for where, text in (("head", head), ("worker", worker)):
        assert re.search(rf"pip install[^&]*-e {re.escape(SRC)}(\s|$)", text), \
            f"{where}: no `pip install -e {SRC}`"
    assert head.index("rsync") < head.index("pip install")


def test_ray_up_header_says_how_to_start_attach_and_launch(ray_up):
    text = ray_up["text"]
    assert "ray up deploy/ray-up.yaml" in text and "ray attach deploy/ray-up.yaml" in text
    assert re.search(r"source ~/kdbench\.env && cd /mnt/kdbench/src && kdbench demo --preset paper", text)


# ---------------------------------------------------------------- both, and the code

def test_both_files_set_the_same_settings(manifest, ray_up):
    ray_up_env = exported(ray_up["config"])
    for _, _, pod in pod_specs(manifest["cluster"]):
        kuberay_env = {e["name"] for e in pod["containers"][0]["env"]}
        assert set(SETTINGS) <= kuberay_env
    assert set(SETTINGS) <= set(ray_up_env)


@pytest.mark.parametrize("name", READ_BY_KDBENCH)
def test_the_names_are_the_ones_kdbench_reads(name):
    code = source_text("orchestration") + source_text("distill_core")
    assert re.search(rf"[\"']{name}[\"']", code), \
        f"deploy/ sets {name}, which no module in orchestration/ or distill_core/ reads"


@pytest.mark.parametrize("name", READ_BY_HUGGINGFACE_HUB)
def test_the_hf_names_are_the_ones_huggingface_hub_reads(name):
    package = Path(find_spec("huggingface_hub").submodule_search_locations[0])
    code = "\n".join(p.read_text() for p in [*package.glob("*.py"), *package.glob("utils/*.py")])
    assert re.search(rf"(environ\.get|getenv)\(\s*[\"']{name}[\"']", code), \
        f"deploy/ sets {name}, which huggingface_hub does not read from the environment"
