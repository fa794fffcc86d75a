"""The study on a real Ray cluster of two nodes, started with Ray's own CLI on this machine (two
raylets, each with its CPU and one `kdbench_trial` slot, so that trials run on both), with an
MLflow tracking server on 127.0.0.1 and a storage root in a temporary directory. The graph is
driven as a user drives it, through RAY_ADDRESS, MLFLOW_TRACKING_URI and KDBENCH_STORAGE_ROOT,
from a working directory of its own. In the middle of the grid the worker node dies (its
raylet and everything on it, SIGKILLed): its trial finishes on the head node from its last
checkpoint, in the same MLflow run, and no step is logged twice."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

BIN = Path(sys.executable).parent
SLOT = "kdbench_trial"  # one a node: one trial a node at a time, and room on the head after a loss
STEPS, CHECKPOINT_EVERY, REPORT_EVERY = 390, 30, 10  # long enough to die mid-trial
OVERRIDES = {
    "distill.groups": ["black_box", "combined"], "distill.seeds": 2, "distill.steps": STEPS,
    "distill.report_every": REPORT_EVERY, "distill.checkpoint_every": CHECKPOINT_EVERY,
    "distill.batch_size": 8, "distill.resources_per_trial": {"cpu": 0.5, SLOT: 1},
    "teacher.train_epochs": 1, "cache.actors": 1,
    "data.train_size": {"sst2": 48, "mmlu": 48, "gsm8k": 48},
    "data.eval_size": {"sst2": 8, "mmlu": 8, "gsm8k": 4},
    "eval.resources_per_model": {"cpu": 0.5},
}
STUDY = """
import json, sys
import dagster as dg
from orchestration.definitions import resources
from orchestration.study import materialize_study
with dg.DagsterInstance.get() as instance:
    metadata = materialize_study(resources(overrides_json=sys.argv[1]), instance)
print("METADATA " + json.dumps({k: metadata[k] for k in
      ("student_checkpoints", "evaluation_table", "comparison_report")}, default=str))
"""
NODES = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print(json.dumps({n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}))
"""


def _wait(condition, what: str, seconds: float):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not happen within {seconds:.0f} s")


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:  # ended meanwhile, or not ours to read
        return b""


def _stop(process: subprocess.Popen) -> None:
    """The process and everything it started (its own session), however it is doing."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; its group may linger a moment
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, free_ports):
    root = tmp_path_factory.mktemp("cluster")
    # Ray's socket paths live under its temp dir and must stay short (a Unix socket's 107 bytes).
    ray_tmp = Path(tempfile.mkdtemp(prefix="kdr", dir="/tmp"))
    gcs, mlflow_port = free_ports(2)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    started, logs = {}, root / "logs"
    logs.mkdir()

    def start(name, args):
        with (logs / f"{name}.log").open("w") as log:
            started[name] = subprocess.Popen(args, env=env, cwd=root, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True)

    node = ["--num-cpus=1", f'--resources={{"{SLOT}": 1}}', "--object-store-memory=150000000",
            "--node-ip-address=127.0.0.1", "--disable-usage-stats", "--block"]
    try:
        start("mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri",
                         f"sqlite:///{root}/server.db", "--artifacts-destination",
                         str(root / "server-artifacts"), "--host", "127.0.0.1",
                         "--port", str(mlflow_port), "--workers", "1"])
        start("head", [str(BIN / "ray"), "start", "--head", f"--port={gcs}", f"--temp-dir={ray_tmp}",
                       "--include-dashboard=false", *node])
        _wait(lambda: _listening(gcs), "the head node's GCS listening", 60)
        start("worker", [str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}", *node])
        address = f"127.0.0.1:{gcs}"

        def two_nodes():
            out = subprocess.run([sys.executable, "-c", NODES, address], env=env, capture_output=True,
                                 text=True, timeout=60)
            nodes = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {}
            return nodes if len(nodes) == 2 else None

        nodes = _wait(two_nodes, "both nodes joining", 90)
        head = next(n for n, r in nodes.items() if "node:__internal_head__" in r)
        (worker,) = set(nodes) - {head}
        _wait(lambda: _healthy(f"http://127.0.0.1:{mlflow_port}/health"), "the MLflow server", 90)
        yield {"root": root, "env": env, "address": address, "head": head, "worker": worker,
               "uri": f"http://127.0.0.1:{mlflow_port}", "processes": started}
    finally:
        for process in reversed(list(started.values())):
            _stop(process)
        # Nothing the test started is left behind: no process of its groups, none of its Ray.
        for name, process in started.items():
            with pytest.raises(ProcessLookupError):
                os.killpg(process.pid, 0)
        left = [proc.name for proc in Path("/proc").glob("[0-9]*")
                if str(ray_tmp).encode() in _cmdline(proc)]
        assert not left, f"processes of the test's Ray cluster still running: {left}"


def _results(experiment_dir: Path) -> dict[str, list[dict]]:
    """Every trial's reported results so far (Tune's result.json lines), by trial dir."""
    out = {}
    for path in experiment_dir.glob("*/result.json"):
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        try:
            out[path.parent.name] = [json.loads(line) for line in lines]
        except json.JSONDecodeError:  # a line being written
            continue
    return out


def test_a_study_on_two_nodes_survives_losing_the_worker_node(cluster):
    root = cluster["root"]
    storage, cwd = root / "storage", root / "driver-cwd"
    cwd.mkdir()
    env = {**cluster["env"], "RAY_ADDRESS": cluster["address"], "MLFLOW_TRACKING_URI": cluster["uri"],
           "KDBENCH_STORAGE_ROOT": str(storage), "DAGSTER_HOME": str(root / "dagster"),
           "TUNE_GLOBAL_CHECKPOINT_S": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}
    (root / "dagster").mkdir()
    log_path = root / "logs" / "study.log"  # a file, not a pipe: a full pipe would stall the run
    with log_path.open("w") as log:
        driver = subprocess.Popen([sys.executable, "-c", STUDY, json.dumps(OVERRIDES)], env=env,
                                  cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def worker_checkpointed():  # a trial on the worker node is past a checkpoint
            assert driver.poll() is None, (f"the study ended (exit {driver.returncode}) before "
                                           f"{storage}/ray_results showed a worker-node trial "
                                           f"past a checkpoint: {log_path.read_text()[-2000:]}")
            for experiment in (storage / "ray_results").glob("*"):
                for trial, results in _results(experiment).items():
                    if any(r["node_id"] == cluster["worker"] and r["step"] > CHECKPOINT_EVERY
                           for r in results):
                        return experiment, trial
            return None

        experiment_dir, killed_trial = _wait(worker_checkpointed, "a trial checkpointing on the worker node", 600)
        worker = cluster["processes"]["worker"]
        os.killpg(worker.pid, signal.SIGKILL)  # the node's raylet and everything on it, at once
        worker.wait(30)
        assert driver.wait(600) == 0, log_path.read_text()[-5000:]
    finally:
        _stop(driver)
    metadata = json.loads(log_path.read_text().split("METADATA ", 1)[1].splitlines()[0])

    results = _results(experiment_dir)
    assert len(results) == 4
    nodes = {r["node_id"] for rs in results.values() for r in rs}
    assert nodes == {cluster["head"], cluster["worker"]}  # trials ran on both nodes
    killed = results[killed_trial]
    assert killed[-1]["node_id"] == cluster["head"] and killed[-1]["step"] == STEPS
    # It resumed from its last checkpoint: the first result on the head follows a checkpoint
    # step, not step 0.
    first_on_head = next(r["step"] for r in killed if r["node_id"] == cluster["head"])
    assert first_on_head > CHECKPOINT_EVERY and (first_on_head - REPORT_EVERY) % CHECKPOINT_EVERY == 0

    client = MlflowClient(cluster["uri"])  # the runs are on the server, not in a file
    parent = metadata["student_checkpoints"]["mlflow_parent_run_id"]
    experiment = client.get_experiment_by_name("kdbench-tiny")
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == 4 and {c.info.status for c in children} == {"FINISHED"}
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "loss")]
        assert sorted(steps) == list(range(REPORT_EVERY, STEPS + 1, REPORT_EVERY)), steps  # none twice
    served = list((root / "server-artifacts").rglob("model.safetensors"))
    assert len(served) == 4  # each trial's checkpoint reached the server's artifact store

    for path in (metadata["student_checkpoints"]["path"], metadata["comparison_report"]["path"],
                 metadata["evaluation_table"]["path"], str(experiment_dir)):
        assert Path(path).is_relative_to(storage), path
    params = [json.loads(p.read_text()) for p in experiment_dir.glob("*/params.json")]
    for p in params:  # every path handed to a trial is absolute and on the storage root
        for key in ("teacher_dir", "student_tokenizer_dir", "output_dir", *[f"cache_dirs.{i}" for i in range(3)]):
            value = p[key.split(".")[0]][int(key.split(".")[1])] if "." in key else p[key]
            assert Path(value).is_absolute() and Path(value).is_relative_to(storage), (key, value)
        assert p["mlflow"]["tracking_uri"] == cluster["uri"]
    assert list(cwd.iterdir()) == []  # nothing written relative to the driver's directory
    assert not list(storage.rglob("*.db"))  # no tracking file beside the artifacts
