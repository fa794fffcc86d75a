"""Dagster resources: the experiment preset, Ray, and MLflow (plain `mlflow`, not
dagster-mlflow, whose pins would downgrade dagster and pandas)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import dagster as dg

from distill_core.config import ExperimentConfig, load_config
from orchestration.console import ray_logging_level

STORAGE_ROOT_VARIABLE = "KDBENCH_STORAGE_ROOT"


def storage_root(configured: str = "") -> Path:
    """The one root every path a worker reads or writes is derived from: `configured`, else
    KDBENCH_STORAGE_ROOT, else the current directory (the checkout, on one machine). Absolute:
    Ray workers run in directories of their own, and on a cluster this is a shared file
    system's mount point, the same path on every node."""
    return Path(configured or os.environ.get(STORAGE_ROOT_VARIABLE) or ".").expanduser().resolve()


class ExperimentResource(dg.ConfigurableResource):
    """Which preset the graph runs, with dotted overrides (JSON), and where its files go:
    `<storage root>/artifacts/<preset>/...` and Ray Tune's `<storage root>/ray_results`."""

    preset: str = "tiny"
    overrides_json: str = "{}"
    storage_root: str = ""  # empty: KDBENCH_STORAGE_ROOT, else the current directory

    def config(self) -> ExperimentConfig:
        return load_config(self.preset, json.loads(self.overrides_json))

    def storage(self) -> Path:
        return storage_root(self.storage_root)

    def root(self) -> Path:
        return self.storage() / "artifacts" / self.config().name

    def tune_storage(self) -> Path:
        return self.storage() / "ray_results"


class RayResource(dg.ConfigurableResource):
    """A local Ray (the machine's CPUs) unless `address` (else RAY_ADDRESS) names a cluster:
    its GCS as `host:port`, `ray://host:port` for Ray Client, or `auto`."""

    address: str = ""
    num_cpus: int | None = None
    connect_timeout_s: float = 10.0

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        import ray

        # Without this, Ray 2.5x writes an auth token under the home directory.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Ray's own variable, as ray.init itself would read it (so it is checked too).
        address = self.address or os.environ.get("RAY_ADDRESS", "")
        if address:
            require_reachable(address, self.connect_timeout_s)
        if ray.is_initialized():
            return
        level = ray_logging_level()  # its "Started a local Ray instance" only with --verbose
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=level)
        else:
            ray.init(num_cpus=self.num_cpus, include_dashboard=False, log_to_driver=False,
                     logging_level=level)

    def nodes(self) -> int:
        """How many nodes the cluster has now."""
        import ray

        return sum(1 for node in ray.nodes() if node["Alive"])


def require_reachable(address: str, timeout_s: float) -> None:
    """ray.init retries an address nobody answers at for minutes, logging warnings; this says
    at once which address it is."""
    if address in ("auto", "local"):
        return
    scheme, _, rest = address.rpartition("://")
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if scheme not in ("", "ray") or not host or not port.isdigit():
        # http://head:8265 is the dashboard's (Ray Jobs') address, not the cluster's
        raise ValueError(f"RayResource.address {address!r} is not host:port (the GCS), "
                         "ray://host:port (Ray Client) or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ConnectionError(f"the Ray cluster at {address} is not reachable ({err}); check "
                              "RayResource.address (RAY_ADDRESS)") from err


class MLflowResource(dg.ConfigurableResource):
    """One experiment a preset. On one machine: a sqlite store with artifacts under
    `artifact_root` (default `<storage root>/mlruns`). On a cluster: an MLflow tracking server
    (`tracking_uri`, else MLflow's own MLFLOW_TRACKING_URI: http(s)://host:port), which
    stores the runs and serves their artifacts; trials on every node log to it over HTTP."""

    tracking_uri: str = ""  # empty: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    artifact_root: str = ""  # a file store's artifacts; empty: <storage root>/mlruns
    ui_url: str = "http://127.0.0.1:5000"

    def resolved_uri(self) -> str:
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
        # Ray Tune runs trials in their own working directories: the path must be absolute.
        prefix = "sqlite:///"
        if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
            return prefix + str(Path(uri[len(prefix):]).resolve())
        return uri

    def is_server(self) -> bool:
        return self.resolved_uri().split("://", 1)[0] in ("http", "https")

    def require_shared(self, nodes: int) -> None:
        """Trials on several nodes cannot share a sqlite file (another node does not see it,
        and sqlite on a network file system corrupts under concurrent writers)."""
        if nodes > 1 and not self.is_server():
            raise RuntimeError(
                f"the Ray cluster has {nodes} nodes, and MLflow tracks in {self.resolved_uri()}: "
                "trials on other nodes need an MLflow tracking server; set MLFLOW_TRACKING_URI "
                "(or MLflowResource.tracking_uri) to http://<host>:<port> of `mlflow server`")

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.resolved_uri())

    def experiment_id(self, name: str) -> str:
        client = self.client()
        try:
            found = client.get_experiment_by_name(name)
        except Exception as err:  # a wrong URI or a server that is down: say which
            raise RuntimeError(f"MLflow tracking at {self.resolved_uri()} is not reachable "
                               f"({type(err).__name__}: {str(err)[:200]}); check "
                               "MLflowResource.tracking_uri") from err
        if found:
            return found.experiment_id
        if self.is_server():  # the server's artifact store (proxied: clients need no mount)
            return client.create_experiment(name)
        location = (Path(self.artifact_root) if self.artifact_root else storage_root() / "mlruns")
        return client.create_experiment(name, artifact_location=f"{location.resolve().as_uri()}/{name}")

    def grid_parent_run(self, experiment_id: str, grid_key: str, dagster_run_id: str,
                        params: dict) -> str:
        """The parent run of the grid `grid_key`: the existing one when the same grid is
        materialized again (Tune resumes it, and its trials are that run's children)."""
        from distill_core.tracking import find_or_create_run

        client = self.client()
        run_id = find_or_create_run(client, experiment_id, f"grid-{grid_key}",
                                    {"kdbench.grid_key": grid_key, "kdbench.asset": "student_checkpoints"},
                                    params, reuse_finished=True)
        client.set_tag(run_id, "dagster.run_id", dagster_run_id)
        return run_id

    def run_url(self, experiment_id: str, run_id: str) -> str:
        return f"{self.ui_url}/#/experiments/{experiment_id}/runs/{run_id}"
