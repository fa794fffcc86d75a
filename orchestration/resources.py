"""Dagster resources: the experiment preset, Ray, and MLflow (plain `mlflow`, not
dagster-mlflow, whose pins would downgrade dagster and pandas)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import dagster as dg

from distill_core.config import ExperimentConfig, load_config


class ExperimentResource(dg.ConfigurableResource):
    """Which preset the graph runs, with dotted overrides (JSON), and where artifacts go."""

    preset: str = "tiny"
    overrides_json: str = "{}"
    artifacts_dir: str = "artifacts"

    def config(self) -> ExperimentConfig:
        return load_config(self.preset, json.loads(self.overrides_json))

    def root(self) -> Path:
        return (Path(self.artifacts_dir) / self.config().name).resolve()

    def tune_storage(self) -> Path:
        """Ray Tune's storage: `ray_results/` beside the artifacts dir (shared storage on a
        multi-node cluster)."""
        return Path(self.artifacts_dir).resolve().parent / "ray_results"


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
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=self.num_cpus, include_dashboard=False, log_to_driver=False)


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
    """Tracking in a sqlite store, artifacts under `artifact_root`; one experiment a preset."""

    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_root: str = "mlruns"
    ui_url: str = "http://127.0.0.1:5000"

    def resolved_uri(self) -> str:
        # Ray Tune runs trials in their own working directories: the path must be absolute.
        prefix = "sqlite:///"
        if self.tracking_uri.startswith(prefix) and not self.tracking_uri.startswith(prefix + "/"):
            return prefix + str(Path(self.tracking_uri[len(prefix):]).resolve())
        return self.tracking_uri

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
        location = Path(self.artifact_root).resolve().as_uri()
        return client.create_experiment(name, artifact_location=f"{location}/{name}")

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
