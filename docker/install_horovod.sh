#!/usr/bin/env bash
# Horovod for the image (docker/Dockerfile's build stage), run with the venv's pip on PATH:
#   install_horovod.sh VERSION WHEELS_DIR
# A wheel of that version in WHEELS_DIR is installed as it is (scripts/test_docker.sh puts there the one
# scripts/setup_env.sh cached on the host, built against the same TensorFlow); otherwise Horovod is
# compiled against the TensorFlow already installed, with scripts/setup_env.sh's flags (several minutes).
# An empty VERSION installs nothing: the current stack has no Horovod and trains with tf-distribute.
set -euo pipefail
HOROVOD_VERSION=$1
WHEELS=$2
if [ -z "$HOROVOD_VERSION" ]; then
  echo "horovod: not installed (HOROVOD_VERSION is empty)"
  exit 0
fi
wheel=$(ls "$WHEELS"/horovod-"$HOROVOD_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [ -n "$wheel" ]; then
  echo "horovod: installing the cached wheel $(basename "$wheel")"
else
  echo "horovod: compiling $HOROVOD_VERSION (no cached wheel in the build context)"
  # Debian bookworm's cmake is 3.25: Horovod's bundled gloo does not configure with pip's cmake 4.x.
  apt-get update
  apt-get install -y --no-install-recommends g++ make cmake
  HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
  HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITHOUT_GPU=1 \
    pip wheel --no-cache-dir --no-build-isolation --no-deps "horovod==$HOROVOD_VERSION" -w /tmp/horovod-build
  wheel=$(ls /tmp/horovod-build/horovod-*.whl)
fi
pip install --no-deps "$wheel"
horovodrun --check-build | grep -E '\[X\] (TensorFlow|Gloo)'
