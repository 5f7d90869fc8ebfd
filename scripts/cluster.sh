#!/usr/bin/env bash
# A Spark standalone cluster on loopback: one master and two workers (1 core, 4 GB each),
# started with the venv's pip pyspark (`spark-class`; the pip package has no sbin/start-*.sh).
#
#   scripts/cluster.sh up       start, and wait until both workers have registered; on a running
#                               cluster, start again any worker that died (a lost machine) and wait for it
#   scripts/cluster.sh status   print the master URL and the alive workers (exit 1 when down)
#   scripts/cluster.sh down     stop everything and remove the state folder (idempotent)
#
# State (pids, logs, master URL, worker work dirs) lives in $CLUSTER_DIR (default .cluster/).
# Environment:
#   CLUSTER_PORT         master RPC port (default: a free port)
#   CLUSTER_WEBUI_PORT   master web UI port (default: a free port); workers' UIs get free ports
#   CLUSTER_WORKERS      number of workers (default 2)
#   CLUSTER_CORES / CLUSTER_MEMORY   per worker (default 1 / 4g)
#   CLUSTER_DIR, VENV    state folder, virtual environment (default .cluster, .venv)
#   CLUSTER_START_TIMEOUT  seconds to wait for the workers (default 120)
# The executors' Python is chosen by each application, not here: PySpark sends the driver's
# PYSPARK_PYTHON (spark-submit --conf spark.pyspark.python=...) to the executors.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CLUSTER_DIR=${CLUSTER_DIR:-$ROOT/.cluster}
VENV=${VENV:-$ROOT/.venv}
WORKERS=${CLUSTER_WORKERS:-2}
CORES=${CLUSTER_CORES:-1}
MEMORY=${CLUSTER_MEMORY:-4g}
START_TIMEOUT=${CLUSTER_START_TIMEOUT:-120}
HOST=127.0.0.1
SPARK_CLASS="$VENV/bin/spark-class"

export SPARK_LOCAL_IP=$HOST
export PATH="$VENV/bin:$PATH"
# A master whose port is taken must fail, not move to the next port while its workers
# knock on the old one.
export SPARK_MASTER_OPTS="${SPARK_MASTER_OPTS:-} -Dspark.port.maxRetries=0"

die() { echo "cluster: $*" >&2; exit 1; }

port_is_free() {
  "$VENV/bin/python" -c 'import socket, sys; s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1])))' "$1" 2>/dev/null
}

free_port() {
  "$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Alive workers according to the master's JSON; empty when the master does not answer.
alive_workers() {
  curl -fsS --max-time 3 "http://$HOST:$1/json/" 2>/dev/null \
    | "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin).get("aliveworkers", 0))' 2>/dev/null || true
}

is_running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Start one daemon in its own session (so `down` can end its whole process group).
start_daemon() {
  local name=$1; shift
  setsid "$@" >"$CLUSTER_DIR/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$CLUSTER_DIR/$name.pid"
}

stop_daemon() {
  local pidfile=$1 pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

# Remove only what `up` creates, whatever CLUSTER_DIR points at.
clean_state() {
  rm -rf "$CLUSTER_DIR"/logs "$CLUSTER_DIR"/worker-[0-9]*/
  rm -f "$CLUSTER_DIR"/*.pid "$CLUSTER_DIR"/master-url "$CLUSTER_DIR"/webui-port
  rmdir "$CLUSTER_DIR" 2>/dev/null || true
}

cmd_down() {
  [ -d "$CLUSTER_DIR" ] || { echo "cluster: not running"; return 0; }
  # Workers first, so the master does not log them as lost and wait for them.
  for pidfile in "$CLUSTER_DIR"/worker-*.pid "$CLUSTER_DIR"/master.pid; do
    [ -e "$pidfile" ] && stop_daemon "$pidfile"
  done
  clean_state
  echo "cluster: stopped"
}

cmd_status() {
  if ! is_running "$CLUSTER_DIR/master.pid"; then
    echo "cluster: not running"
    return 1
  fi
  local webui alive
  webui=$(cat "$CLUSTER_DIR/webui-port")
  alive=$(alive_workers "$webui")
  echo "master:  $(cat "$CLUSTER_DIR/master-url" 2>/dev/null || echo "(starting)") (web UI http://$HOST:$webui)"
  echo "workers: ${alive:-0} alive"
  echo "logs:    $CLUSTER_DIR/logs"
}

start_worker() {
  local i=$1 url=$2
  mkdir -p "$CLUSTER_DIR/worker-$i"
  start_daemon "worker-$i" "$SPARK_CLASS" org.apache.spark.deploy.worker.Worker "$url" \
    --host "$HOST" --cores "$CORES" --memory "$MEMORY" --webui-port "$(free_port)" \
    --work-dir "$CLUSTER_DIR/worker-$i"
}

# Wait until $WORKERS workers are alive; on failure print the logs, stop everything ($2 = "stop") or not.
wait_for_workers() {
  local webui=$1 on_failure=$2 deadline=$((SECONDS + START_TIMEOUT)) alive="" pidfile name
  while [ $SECONDS -lt $deadline ]; do
    alive=$(alive_workers "$webui")
    [ "${alive:-0}" -ge "$WORKERS" ] && return 0
    for pidfile in "$CLUSTER_DIR"/*.pid; do
      is_running "$pidfile" && continue
      name=$(basename "$pidfile" .pid)
      tail -n 20 "$CLUSTER_DIR/logs/$name.log" >&2 || true
      [ "$on_failure" = stop ] && cmd_down >/dev/null
      die "$name exited during start-up (log above)"
    done
    sleep 1
  done
  tail -n 20 "$CLUSTER_DIR"/logs/*.log >&2 || true
  [ "$on_failure" = stop ] && cmd_down >/dev/null
  die "only ${alive:-0} of $WORKERS workers registered within ${START_TIMEOUT}s (logs above)"
}

# A running master: start again the workers that died (their process gone), keeping the others.
restart_lost_workers() {
  local url i lost=0
  url=$(cat "$CLUSTER_DIR/master-url" 2>/dev/null) || die "the master is still starting (no $CLUSTER_DIR/master-url)"
  for i in $(seq 1 "$WORKERS"); do
    is_running "$CLUSTER_DIR/worker-$i.pid" && continue
    echo "cluster: worker $i is not running: starting it again"
    start_worker "$i" "$url"
    lost=$((lost + 1))
  done
  if [ $lost -gt 0 ]; then
    wait_for_workers "$(cat "$CLUSTER_DIR/webui-port")" keep
  else
    echo "cluster: already running"
  fi
}

cmd_up() {
  [ -x "$SPARK_CLASS" ] || die "$SPARK_CLASS not found: run 'make setup' first"
  command -v java >/dev/null || die "Java 17 is required (java not on PATH)"
  command -v curl >/dev/null || die "curl is required to poll the master"
  # spark-class looks for pyspark with whatever python3 is on PATH; name the venv's pyspark.
  SPARK_HOME=$("$VENV/bin/python" -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))') \
    || die "no pyspark in $VENV: run 'make setup' first"
  export SPARK_HOME
  if is_running "$CLUSTER_DIR/master.pid"; then
    restart_lost_workers
    cmd_status
    return 0
  fi
  clean_state   # leftovers of a cluster that died
  local port=${CLUSTER_PORT:-$(free_port)} webui=${CLUSTER_WEBUI_PORT:-$(free_port)}
  local url="spark://$HOST:$port"
  port_is_free "$port" || die "port $port (master) is in use; choose another CLUSTER_PORT"
  port_is_free "$webui" || die "port $webui (master web UI) is in use; choose another CLUSTER_WEBUI_PORT"
  mkdir -p "$CLUSTER_DIR/logs"
  echo "$webui" > "$CLUSTER_DIR/webui-port"

  start_daemon master "$SPARK_CLASS" org.apache.spark.deploy.master.Master \
    --host "$HOST" --port "$port" --webui-port "$webui"
  for i in $(seq 1 "$WORKERS"); do
    start_worker "$i" "$url"
  done
  wait_for_workers "$webui" stop
  echo "$url" > "$CLUSTER_DIR/master-url"
  echo "cluster: $url up with $WORKERS workers ($CORES core(s), $MEMORY each); web UI http://$HOST:$webui"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
