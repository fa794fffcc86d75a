"""The two UIs for real: `scripts/ui.sh` (what `make ui` runs) serves Dagster and MLflow on
127.0.0.1 only; headless Chromium (the distribution's package, driven by Selenium) finds the
seven assets in Dagster's asset graph and the trial runs nested under their grid's parent run
in MLflow; Ctrl-C stops both servers and everything they started.

The browser tests are skipped where Chromium or its driver is missing (scripts/install_browser.sh, run by
`make test`, installs both with apt where it can); the servers' tests run everywhere."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from distill_core.tracking import TrialRun
from orchestration.definitions import all_assets, sources
from orchestration.resources import MLflowResource

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="Chromium and chromedriver are not installed (scripts/install_browser.sh, run by make test, installs them with apt)")

ASSETS = sorted(key.to_user_string() for a in all_assets for key in a.keys)
TRIALS = [f"{g}-seed{s}" for g in ("black_box", "combined") for s in (0, 1)]
START_TIMEOUT_S = 300  # dagster dev starts a webserver, a daemon and their code servers


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """An MLflow store holding a grid's parent run and its trials' child runs, written by the
    code the grid uses (MLflowResource for the parent, TrialRun inside each trial)."""
    root = tmp_path_factory.mktemp("tracked")
    mlflow = MLflowResource(tracking_uri=f"sqlite:///{root}/mlflow.db",
                            artifact_root=str(root / "mlruns"))
    experiment_id = mlflow.experiment_id("kdbench-tiny")
    parent_id = mlflow.grid_parent_run(experiment_id, "uitest", "no-dagster-run",
                                       params={"preset": "tiny"})
    for name in TRIALS:
        group, seed = name.rsplit("-seed", 1)
        run = TrialRun.start(mlflow.resolved_uri(), experiment_id, parent_id, name,
                             params={"group": group, "seed": seed},
                             tags={"group": group, "seed": seed})
        run.log_metrics({"loss": 1.0, "L_KD": 0.5}, step=5)
        run.finish()
    mlflow.client().set_terminated(parent_id, "FINISHED")
    return {"uri": mlflow.resolved_uri(), "artifacts": str(root / "mlruns"),
            "experiment_id": experiment_id, "parent": "grid-uitest"}


@pytest.fixture(scope="module")
def ui(tmp_path_factory, tracked, free_ports):
    """scripts/ui.sh in a session of its own (as a terminal runs it), on free ports, with an
    empty Dagster instance (nothing for the automation to start) and the tracked store."""
    home = tmp_path_factory.mktemp("dagster_home")
    ports = dict(zip(("dagster", "mlflow"), free_ports(2)))
    env = {**os.environ, "DAGSTER_HOME": str(home), "DAGSTER_PORT": str(ports["dagster"]),
           "MLFLOW_PORT": str(ports["mlflow"]), "MLFLOW_BACKEND_STORE_URI": tracked["uri"],
           "MLFLOW_DEFAULT_ARTIFACT_ROOT": tracked["artifacts"],
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = (home / "ui.log").open("w")
    script = subprocess.Popen([str(ROOT / "scripts" / "ui.sh")], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    urls = {"dagster": f"http://127.0.0.1:{ports['dagster']}",
            "mlflow": f"http://127.0.0.1:{ports['mlflow']}"}
    info = {"script": script, "home": home, "ports": ports, "urls": urls, "log": home / "ui.log"}
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (_answers(urls["dagster"] + "/server_info") and _answers(urls["mlflow"] + "/health")):
            assert script.poll() is None, f"ui.sh exited: {info['log'].read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the UIs did not answer: {info['log'].read_text()[-3000:]}"
            time.sleep(1)
        yield info
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
        for pid in _started_by(home):  # whatever a failed test left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log.close()


def _started_by(dagster_home: Path) -> list[int]:
    """Live processes whose environment names this DAGSTER_HOME: ui.sh and all it started."""
    marker = f"DAGSTER_HOME={dagster_home}".encode() + b"\0"
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker in (proc / "environ").read_bytes() and \
                        (proc / "stat").read_text().split(") ")[-1][0] != "Z":
                    pids.append(int(proc.name))
            except OSError:  # gone, or not ours to read
                continue
    return pids


def _listening(port: int) -> dict[str, str]:
    """The TCP sockets listening on `port` (from /proc/net/tcp*): socket inode -> local address."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                if len(raw) == 4:
                    found[fields[9]] = socket.inet_ntop(socket.AF_INET, raw[::-1])
                else:  # four little-endian 32-bit words
                    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                    found[fields[9]] = socket.inet_ntop(socket.AF_INET6, words)
    return found


def _holders(inode: str) -> set[int]:
    """The processes that hold the socket `inode` open (uvicorn's workers share theirs)."""
    holders = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == f"socket:[{inode}]" for fd in fd_dir.iterdir()):
                holders.add(int(fd_dir.parent.name))
        except OSError:
            continue
    return holders


def test_both_uis_listen_on_localhost_only_and_mlflow_in_one_process(ui):
    for name, port in ui["ports"].items():
        assert set(_listening(port).values()) == {"127.0.0.1"}, name
    (mlflow_socket,) = _listening(ui["ports"]["mlflow"])
    assert len(_holders(mlflow_socket)) == 1  # one worker


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Chromium and chromedriver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # A wide window makes the asset graph draw full nodes (with whole names), not zoomed-out
    # boxes; Chromium refuses to run as root with its sandbox.
    for arg in ("--headless=new", "--disable-dev-shm-usage", "--window-size=2400,1400",
                *(["--no-sandbox"] if os.geteuid() == 0 else [])):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _texts(driver, xpath: str) -> set[str]:
    return {e.text.strip() for e in driver.find_elements("xpath", xpath) if e.text.strip()}


@needs_chromium
def test_the_dagster_asset_graph_shows_the_seven_assets(ui, browser):
    from selenium.webdriver.support.ui import WebDriverWait

    assert len(ASSETS) == 7
    groups = sorted({g for a in all_assets for g in a.group_names_by_key.values()}
                    | {s.group_name for s in sources})
    # The global lineage with every group expanded (the UI keeps that in its `expanded` query).
    browser.get(ui["urls"]["dagster"] + "/asset-groups?expanded=" +
                ",".join(f"global@global:{g}" for g in groups))
    names = " or ".join(f"normalize-space(text())='{n}'" for n in [*ASSETS, "train_files", "eval_files"])
    nodes = f"//*[local-name()='foreignObject']//div[{names}]"  # the graph's nodes, not the sidebar
    shown = WebDriverWait(browser, 120, poll_frequency=1).until(
        lambda d: (found := _texts(d, nodes)) >= {*ASSETS, "train_files", "eval_files"} and found)
    assert set(ASSETS) <= shown
    assert _texts(browser, "//*[contains(normalize-space(text()), 'Materialize all (7)')]")


@needs_chromium
def test_the_mlflow_experiment_nests_the_trial_runs_under_their_grid(ui, browser, tracked):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{ui['urls']['mlflow']}/#/experiments/{tracked['experiment_id']}/runs"
                "?workflowType=machine_learning")
    run_names = "//a[contains(@href, '/runs/')]/span"
    parent = f"//a[normalize-space(.)='{tracked['parent']}']"
    WebDriverWait(browser, 120, poll_frequency=1).until(lambda d: d.find_elements("xpath", parent))
    assert _texts(browser, run_names) == {tracked["parent"]}  # the trials are nested, not listed
    expander = parent + "/ancestor::span[contains(@class, 'ag-cell-value')]//button"

    def expand(d):  # the table may re-render under the click: find the button anew
        try:
            d.find_element("xpath", expander).click()
            return True
        except StaleElementReferenceException:
            return False

    WebDriverWait(browser, 30, poll_frequency=0.5).until(expand)
    shown = WebDriverWait(browser, 60, poll_frequency=0.5).until(
        lambda d: (names := _texts(d, run_names)) > {tracked["parent"]} and names)
    assert shown == {tracked["parent"], *TRIALS}


def test_ctrl_c_stops_both_servers_and_all_they_started(ui):
    assert _started_by(ui["home"])
    os.killpg(ui["script"].pid, signal.SIGINT)  # what Ctrl-C sends to the terminal's job
    ui["script"].wait(timeout=120)
    deadline = time.monotonic() + 30
    while _started_by(ui["home"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _started_by(ui["home"]), ui["log"].read_text()[-3000:]
    for name, port in ui["ports"].items():
        assert not _listening(port), name
