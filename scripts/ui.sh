#!/usr/bin/env bash
# Start the Dagster UI and the MLflow UI on 127.0.0.1; Ctrl-C stops both.
set -euo pipefail
HOST=${KDBENCH_UI_HOST:-127.0.0.1}
DAGSTER_PORT=${DAGSTER_PORT:-3000}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
# On a cluster this MLflow server is the one trials log to: MLFLOW_HOST=0.0.0.0 lets the other
# nodes reach it (then MLFLOW_TRACKING_URI=http://<this host>:$MLFLOW_PORT everywhere). MLflow 3
# answers only localhost and private IPs unless MLFLOW_ALLOWED_HOSTS lists the names used.
MLFLOW_HOST=${MLFLOW_HOST:-$HOST}
STORAGE=${KDBENCH_STORAGE_ROOT:-$PWD}
export DAGSTER_HOME=${DAGSTER_HOME:-$PWD/.dagster}
mkdir -p "$DAGSTER_HOME"
# The project's instance settings (telemetry off), unless the home has its own.
[ -f "$DAGSTER_HOME/dagster.yaml" ] || cp dagster.yaml "$DAGSTER_HOME/dagster.yaml"

# dagster dev started from a script ignores SIGINT unless INT is untrapped for it; setsid gives
# it a process group of its own (its code servers included) that stop() can end as a whole.
(trap - INT; exec setsid dagster dev -w workspace.yaml -h "$HOST" -p "$DAGSTER_PORT") &
DAGSTER_PID=$!
# One worker keeps MLflow light. The store is the one the demo and trials write, unless
# MLflow's own variables name another; the server also serves (proxies) artifacts, so that
# trials on other nodes log theirs over HTTP.
mlflow server --backend-store-uri "${MLFLOW_BACKEND_STORE_URI:-sqlite:///$PWD/mlflow.db}" \
  --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-$STORAGE/mlruns}" --serve-artifacts \
  --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" --workers 1 \
  ${MLFLOW_ALLOWED_HOSTS:+--allowed-hosts "$MLFLOW_ALLOWED_HOSTS"} &
MLFLOW_PID=$!

stop() {
  trap - INT TERM EXIT
  kill -TERM -- "-$DAGSTER_PID" 2>/dev/null || true
  kill -TERM "$MLFLOW_PID" 2>/dev/null || true
  # dagster dev can linger after its daemon stops; give both 15 s, then end them.
  for _ in $(seq 30); do kill -0 "$DAGSTER_PID" 2>/dev/null || kill -0 "$MLFLOW_PID" 2>/dev/null || return 0; sleep 0.5; done
  kill -KILL -- "-$DAGSTER_PID" 2>/dev/null || true
  kill -KILL "$MLFLOW_PID" 2>/dev/null || true
}
trap stop INT TERM EXIT
echo "Dagster: http://$HOST:$DAGSTER_PORT   MLflow: http://$HOST:$MLFLOW_PORT   (Ctrl-C stops both)"
wait -n "$DAGSTER_PID" "$MLFLOW_PID"
