#!/usr/bin/env bash
# make test-docker: build the image of each stack in DOCKER_STACKS (pinned, current or both), start the
# compose cluster (docker/docker-compose.yml: a master and two workers) under a project name of its own,
# submit the pipeline to it on a small fixed sample of the X-rays, check its outputs on the host, and take
# the cluster down again (containers, network, volumes) however the run ends.
#   DOCKER_STACKS="pinned current" bash scripts/test_docker.sh
# Where the Docker engine is missing and this runs as root with apt, Debian's docker.io is installed and
# dockerd started (and stopped at the end); where Docker cannot run, prints "SKIPPED: <reason>", exits 0.
# BASE=<image> builds on that image; otherwise on the official Python image when it is already here,
# else on one made from Debian's packages (scripts/docker_base.sh): no image registry is needed.
# SAMPLE_PER_CLASS images of each class of DATA (default 25, chosen by the rule below), EPOCHS (2),
# BATCH_SIZE per rank (8). KEEP_RUNS=<dir> keeps a copy of each run directory there.
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKER_STACKS=${DOCKER_STACKS:-${STACK:-pinned}}
DATA=${DATA:-../shared/data/cxr3}
SAMPLE_PER_CLASS=${SAMPLE_PER_CLASS:-25}
EPOCHS=${EPOCHS:-2}
# Per rank: two ranks of the default 32 would want more images than the sample's train split has.
BATCH_SIZE=${BATCH_SIZE:-8}
HOROVOD_VERSION=$(sed -n 's/^HOROVOD_VERSION=//p' scripts/setup_env.sh)
TF_VERSION=$(sed -n 's/^tensorflow-cpu==\([^ ]*\).*/\1/p' requirements.txt)
WHEEL_CACHE=${COVID_SPARK_CACHE:-$HOME/.cache/covid-spark}/wheels/horovod-$HOROVOD_VERSION-tf-$TF_VERSION

log() { echo "test-docker: $*"; }
skip() { echo "SKIPPED: $*"; exit 0; }
for stack in $DOCKER_STACKS; do
  case "$stack" in pinned|current) ;; *) echo "test-docker: unknown stack '$stack' (pinned or current)" >&2; exit 2 ;; esac
done
[ -f "$DATA/manifest.csv" ] || { echo "test-docker: $DATA/manifest.csv not found (DATA=the X-ray folder)" >&2; exit 1; }

# --- the Docker engine and compose ---------------------------------------------------------------
DOCKERD_PID=""
as_root_with_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }
apt_install() {
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"; } >/dev/null 2>&1
}
if ! docker info >/dev/null 2>&1; then
  as_root_with_apt || skip "no Docker engine answers, and installing or starting one needs root and apt-get"
  if ! command -v dockerd >/dev/null 2>&1; then
    log "installing Debian's docker.io"
    apt_install docker.io || skip "apt-get could not install docker.io"
  fi
  log "starting dockerd (stopped again at the end)"
  dockerd >/var/log/covid-spark-dockerd.log 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 \
    || { kill "$DOCKERD_PID" 2>/dev/null || true; skip "dockerd does not start here ($(tail -n 1 /var/log/covid-spark-dockerd.log))"; }
fi
if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null 2>&1 || { as_root_with_apt && apt_install docker-compose; }; then
  COMPOSE=(docker-compose)
else
  skip "neither 'docker compose' nor docker-compose is available"
fi

# --- everything this run makes, taken down on any exit ---------------------------------------------
WORK=$(mktemp -d /tmp/covid-spark-docker.XXXXXX)
PROJECT=""
compose() { "${COMPOSE[@]}" -p "$PROJECT" -f docker/docker-compose.yml "$@"; }
take_down() {
  if [ -n "$PROJECT" ]; then
    compose down -v --remove-orphans -t 5 >/dev/null 2>&1 || true
    # What compose could not remove (a container of a failed `run`, say), by the project's label.
    docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" | xargs -r docker rm -f >/dev/null 2>&1 || true
    docker network ls -q --filter "label=com.docker.compose.project=$PROJECT" | xargs -r docker network rm >/dev/null 2>&1 || true
    docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT" | xargs -r docker volume rm >/dev/null 2>&1 || true
    PROJECT=""
  fi
}
cleanup() {
  status=$?
  take_down
  rm -rf "$WORK" docker/wheels/*.whl docker/certs/*.crt
  if [ -n "$DOCKERD_PID" ]; then
    kill "$DOCKERD_PID" 2>/dev/null && wait "$DOCKERD_PID" 2>/dev/null || true
  fi
  exit $status
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the sample: SAMPLE_PER_CLASS images of each class, spread evenly over the manifest's rows -------
python3 - "$DATA" "$WORK/data" "$SAMPLE_PER_CLASS" <<'EOF'
import csv, os, shutil, sys
source, target, per_class = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(os.path.join(source, "manifest.csv"), newline="") as handle:
    reader = csv.DictReader(handle)
    fields, rows = reader.fieldnames, list(reader)
chosen = []
for label in sorted({row["label"] for row in rows}):
    of_label = sorted((row for row in rows if row["label"] == label), key=lambda row: row["path"])
    step = max(1, len(of_label) // per_class)
    chosen += of_label[::step][:per_class]
for row in chosen:
    os.makedirs(os.path.join(target, os.path.dirname(row["path"])), exist_ok=True)
    shutil.copyfile(os.path.join(source, row["path"]), os.path.join(target, row["path"]))
with open(os.path.join(target, "manifest.csv"), "w", newline="") as handle:
    writer = csv.DictWriter(handle, fieldnames=fields)
    writer.writeheader()
    writer.writerows(chosen)
print(f"test-docker: sample of {len(chosen)} images of {source} in {target}/manifest.csv")
EOF
chmod -R a+rX "$WORK"

# --- the image of a stack ------------------------------------------------------------------------
build_image() {
  local stack=$1 base official args=() start
  if [ "$stack" = pinned ]; then
    official=python:3.11-slim-bookworm
  else
    official=python:3.12-slim-bookworm
    args=(--build-arg REQUIREMENTS=requirements-current.txt --build-arg HOROVOD_VERSION=)
  fi
  if [ -n "${BASE:-}" ]; then
    base=$BASE
  elif docker image inspect "$official" >/dev/null 2>&1; then
    base=$official
  else
    command -v debootstrap >/dev/null 2>&1 || { as_root_with_apt && apt_install debootstrap; } \
      || skip "no image registry and no debootstrap to make a base image"
    start=$SECONDS
    base=$(bash scripts/docker_base.sh "$stack")
    log "base image $base ready in $((SECONDS - start)) s"
  fi
  rm -f docker/wheels/*.whl docker/certs/*.crt
  # The CA certificates this machine adds (a TLS-inspecting proxy in front of PyPI, say), for pip in the build stage.
  cp /usr/local/share/ca-certificates/*.crt docker/certs/ 2>/dev/null || true
  if [ "$stack" = pinned ]; then
    if ls "$WHEEL_CACHE"/horovod-*.whl >/dev/null 2>&1; then
      cp "$WHEEL_CACHE"/horovod-*.whl docker/wheels/
      log "pinned image: Horovod from the host's cached wheel ($(basename "$WHEEL_CACHE"))"
    else
      log "pinned image: Horovod compiled in the image (no cached wheel in $WHEEL_CACHE)"
    fi
  fi
  log "building covid-spark:$stack on $base"
  start=$SECONDS
  if ! docker build --network host --force-rm -f docker/Dockerfile -t "covid-spark:$stack" --build-arg "BASE=$base" "${args[@]}" . \
       >"$WORK/build-$stack.log" 2>&1; then
    tail -n 40 "$WORK/build-$stack.log"
    echo "test-docker: building covid-spark:$stack failed (last lines above)" >&2
    return 1
  fi
  grep '^horovod: ' "$WORK/build-$stack.log" || [ "$stack" = current ] || log "Horovod's layer came from the build cache"
  log "build time covid-spark:$stack: $((SECONDS - start)) s"
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# --- the cluster run of a stack --------------------------------------------------------------------
run_cluster() {
  local stack=$1 start runs="$WORK/runs-$stack" run_id="docker-$1"
  mkdir -p "$runs"
  # Owned by someone else than root, as a user's folder would be: the run must come back owned by them.
  local owner="$(id -u):$(id -g)"
  if [ "$(id -u)" = 0 ]; then owner=1000:1000; chown "$owner" "$runs"; fi
  PROJECT="covid-spark-test-$stack-$$-$(date +%s)"
  export IMAGE="covid-spark:$stack" DATA="$WORK/data" RUNS="$runs" RUN_ID="$run_id" WEBUI_PORT
  WEBUI_PORT=$(free_port)
  start=$SECONDS
  log "starting the cluster (compose project $PROJECT)"
  compose up -d spark-master spark-worker-1 spark-worker-2 >"$WORK/up-$stack.log" 2>&1 \
    || { cat "$WORK/up-$stack.log"; compose logs --tail 30; return 1; }
  python3 - "$WEBUI_PORT" <<'EOF' || { compose logs --tail 30; return 1; }
import json, sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/json/"
deadline, alive = time.time() + 180, 0
while time.time() < deadline:
    try:
        state = json.load(urllib.request.urlopen(url, timeout=3))
        alive = sum(worker["state"] == "ALIVE" for worker in state["workers"])
        if alive >= 2:
            print(f"test-docker: master {state['url']} has {alive} workers alive")
            sys.exit(0)
    except OSError:
        pass
    time.sleep(2)
sys.exit(f"test-docker: {alive} of 2 workers registered with the master within 180 s")
EOF
  log "submitting the pipeline ($EPOCHS epochs, batch $BATCH_SIZE per rank) to the cluster"
  # The compose file's submit command with a short training: the driver is the container named
  # `submit` on the project's network (--use-aliases), executors connect back to it. -T: no terminal (CI).
  if ! compose run -T --rm --use-aliases submit run_as_runs_owner.sh \
        spark-submit --master spark://spark-master:7077 --properties-file conf/spark-docker.conf \
        --conf spark.driver.host=submit \
        jobs/pipeline.py --input /data --run-dir "/runs/$run_id" --config conf/demo.yaml --epochs "$EPOCHS" \
        --set "train.batch_size=$BATCH_SIZE" \
        >"$WORK/submit-$stack.log" 2>&1; then
    tail -n 60 "$WORK/submit-$stack.log"
    echo "test-docker: the pipeline failed on the $stack cluster (last lines above)" >&2
    return 1
  fi
  python3 - "$WEBUI_PORT" <<'EOF'
import json, sys, urllib.request
state = json.load(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/json/", timeout=5))
apps = state["completedapps"]
assert apps, "the master lists no completed application"
print("test-docker: the master ran " + ", ".join(f"{app['name']} ({app['cores']} cores, {app['state']})" for app in apps))
EOF
  take_down
  log "cluster run time ($stack): $((SECONDS - start)) s (start, pipeline, take-down)"
  check_outputs "$runs/$run_id" "$owner" "$stack"
  if [ -n "${KEEP_RUNS:-}" ]; then
    mkdir -p "$KEEP_RUNS" && cp -a "$runs/$run_id" "$KEEP_RUNS/" && log "run kept in $KEEP_RUNS/$run_id"
  fi
}

check_outputs() {
  python3 - "$@" <<'EOF'
import json, os, sys
run, owner, stack = sys.argv[1], sys.argv[2], sys.argv[3]
def need(name):
    path = os.path.join(run, name)
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        sys.exit(f"test-docker: {path} missing or empty")
    return path
need("model.keras")
with open(need("metrics.json")) as handle:
    metrics = json.load(handle)
missing = {"classes", "n", "accuracy", "macro_f1", "per_class", "confusion_matrix"} - set(metrics)
if missing:
    sys.exit(f"test-docker: metrics.json lacks {sorted(missing)}")
f1, n = metrics["macro_f1"], metrics["n"]
if not (isinstance(f1, float) and 0.2 <= f1 <= 1.0 and n > 0):
    sys.exit(f"test-docker: macro-F1 {f1!r} on {n} test images is outside 0.2-1.0")
with open(need("report.html"), encoding="utf-8") as handle:
    if "<html" not in handle.read(4096).lower():
        sys.exit("test-docker: report.html is not HTML")
uid, gid = (int(part) for part in owner.split(":"))
others = [os.path.join(root, name) for root, dirs, files in os.walk(run) for name in dirs + files
          if (os.lstat(os.path.join(root, name)).st_uid, os.lstat(os.path.join(root, name)).st_gid) != (uid, gid)]
if others:
    sys.exit(f"test-docker: {len(others)} files of the run are not owned by {owner}, e.g. {others[0]}")
print(f"test-docker: {stack}: model, metrics and report written; test macro-F1 {f1:.3f}, "
      f"accuracy {metrics['accuracy']:.3f} on {n} images; owned by {owner}")
EOF
}

for stack in $DOCKER_STACKS; do
  build_image "$stack"
  run_cluster "$stack"
done
log "passed ($DOCKER_STACKS)"
