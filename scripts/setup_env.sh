#!/usr/bin/env bash
# Create the venv of one stack (docs/stacks.md), chosen by STACK:
#   STACK=pinned (default): .venv, Python 3.11, requirements.txt, Horovod built against its TensorFlow,
#                           and the optional experiment tracking (requirements-mlflow.txt: the `mlflow` extra);
#   STACK=current:          .venv-current, Python 3.12, requirements-current.txt, no Horovod, no MLflow.
# Either installs Debian's chromium for the report's browser test where this runs as root with apt.
# Idempotent: does nothing when the stack's requirements files, setup.py and this script are unchanged
# (and chromium is there or cannot be installed here).
# The Horovod wheel is cached outside the clone, keyed by Horovod and TensorFlow versions,
# so a fresh clone on the same machine installs it in seconds instead of compiling (~8 min).
set -euo pipefail
cd "$(dirname "$0")/.."

STACK=${STACK:-pinned}
case "$STACK" in
  pinned)  PYTHON=${PYTHON:-python3.11}; VENV=${VENV:-.venv}; REQUIREMENTS=requirements.txt ;;
  current) PYTHON=${PYTHON:-python3.12}; VENV=${VENV:-.venv-current}; REQUIREMENTS=requirements-current.txt ;;
  *) echo "setup: STACK must be pinned or current, found '$STACK'" >&2; exit 2 ;;
esac
if ! "$PYTHON" -c 'import sys' 2>/dev/null; then  # pyenv shims name versions they do not select
  for candidate in "$HOME/.pyenv/versions/${PYTHON#python}".*/bin/"$PYTHON"; do
    [ -x "$candidate" ] && PYTHON=$candidate
  done
fi
"$PYTHON" -c 'import sys' 2>/dev/null \
  || { echo "setup: the $STACK stack needs $PYTHON on PATH (or PYTHON=/path/to/python)" >&2; exit 1; }
HOROVOD_VERSION=0.28.1
TF_VERSION=$(sed -n 's/^tensorflow-cpu==\([^ ]*\).*/\1/p' "$REQUIREMENTS")
CACHE=${COVID_SPARK_CACHE:-$HOME/.cache/covid-spark}
WHEEL_DIR="$CACHE/wheels/horovod-$HOROVOD_VERSION-tf-$TF_VERSION"

EXTRAS=$([ "$STACK" = pinned ] && echo requirements-mlflow.txt || true)
stamp_of() { cat "$REQUIREMENTS" $EXTRAS setup.py scripts/setup_env.sh | sha256sum | cut -c1-16; }

# The report's browser test (tests/test_report_browser.py) drives Debian's chromium; it skips, saying
# why, where there is none. Installed only when missing, only as root with apt; never fails the set-up.
# The two stacks' set-ups may run at once (.ci/run): what both would do in one place (apt-get, the editable
# install's egg-info in this folder) runs under a lock, one at a time.
locked() { ( if command -v flock >/dev/null; then flock 9; fi; "$@" ) 9>"${TMPDIR:-/tmp}/covid-spark-setup.lock"; }
install_chromium() {
  command -v chromium >/dev/null 2>&1 && return 0  # the other set-up installed it meanwhile
  echo "setup: installing Debian's chromium (headless, for the report's browser test)"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
       >/dev/null 2>&1; then
    echo "setup: apt-get could not install chromium; the browser test will be skipped" >&2
  fi
}
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  locked install_chromium
fi

STAMP="$VENV/.covid-spark-stamp"
want=$(stamp_of)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  echo "setup: $VENV is up to date"
  exit 0
fi

command -v java >/dev/null || { echo "setup: Java 17 is required for Spark (java not on PATH)" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
$PIP install -q -r "$REQUIREMENTS"

if [ "$STACK" = current ]; then  # no Horovod: training runs with train.engine tf-distribute
  locked $PIP install -q --no-deps -e .
  echo "$want" > "$STAMP"
  echo "setup: $VENV ready (current stack)"
  exit 0
fi
$PIP install -q -r requirements-mlflow.txt

if ! "$VENV/bin/python" -c "import horovod, sys; sys.exit(horovod.__version__ != '$HOROVOD_VERSION')" 2>/dev/null; then
  if ! ls "$WHEEL_DIR"/horovod-*.whl >/dev/null 2>&1; then
    cmake_major=$(cmake --version | sed -n 's/^cmake version \([0-9]*\).*/\1/p')
    [ "$cmake_major" = 3 ] || { echo "setup: Horovod needs cmake 3.x on PATH (found: ${cmake_major:-none})" >&2; exit 1; }
    echo "setup: building Horovod $HOROVOD_VERSION against TensorFlow $TF_VERSION (several minutes, once)"
    mkdir -p "$WHEEL_DIR.tmp"
    HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
    HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITHOUT_GPU=1 \
      $PIP wheel -q --no-cache-dir --no-build-isolation --no-deps "horovod==$HOROVOD_VERSION" -w "$WHEEL_DIR.tmp"
    rm -rf "$WHEEL_DIR" && mv "$WHEEL_DIR.tmp" "$WHEEL_DIR"
  fi
  $PIP install -q --no-deps "$WHEEL_DIR"/horovod-*.whl
fi
locked $PIP install -q --no-deps -e .
"$VENV/bin/horovodrun" --check-build | grep -E '\[X\] (TensorFlow|Gloo)' >/dev/null \
  || { echo "setup: Horovod was built without TensorFlow or Gloo support" >&2; exit 1; }
echo "$want" > "$STAMP"
echo "setup: $VENV ready"
