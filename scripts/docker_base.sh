#!/usr/bin/env bash
# A base image for docker/Dockerfile made from Debian's packages, for machines that reach Debian's
# mirror and PyPI but no image registry (so `FROM python:3.1x-slim-bookworm` cannot be pulled).
#   scripts/docker_base.sh pinned    → covid-spark-base:py3.11-bookworm (bookworm's own Python 3.11)
#   scripts/docker_base.sh current   → covid-spark-base:py3.12-bookworm (bookworm has no 3.12: this
#                                       machine's CPython 3.12 build, copied to /usr/local)
# Prints the image name on stdout (progress goes to stderr). An image of that name is reused as it is;
# `docker rmi` it to make it again. Either image looks like the official one it replaces to the
# Dockerfile: `python` on PATH with pip, venv and the C headers, ca-certificates, LANG=C.UTF-8.
# Needs root, debootstrap and a running Docker engine.
set -euo pipefail

STACK=${1:-${STACK:-pinned}}
ROOTFS=covid-spark-debian:bookworm
case "$STACK" in
  pinned)  IMAGE=covid-spark-base:py3.11-bookworm ;;
  current) IMAGE=covid-spark-base:py3.12-bookworm ;;
  *) echo "docker_base: STACK must be pinned or current, found '$STACK'" >&2; exit 2 ;;
esac

log() { echo "docker_base: $*" >&2; }
have_image() { docker image inspect "$1" >/dev/null 2>&1; }

if have_image "$IMAGE"; then
  log "$IMAGE exists; reused"
  echo "$IMAGE"
  exit 0
fi

# The Debian mirror apt uses here, from deb822 .sources files or one-line sources.list entries:
# the URI of the entry that lists the suite ($1, e.g. bookworm or bookworm-security).
mirror_for() {
  local suite=$1 file
  for file in /etc/apt/sources.list.d/*.sources; do
    [ -f "$file" ] || continue
    awk -v suite="$suite" '
      /^[[:space:]]*$/ { if (uri != "" && hit) { print uri; exit } uri = ""; hit = 0; next }
      /^URIs:/ { uri = $2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) hit = 1 }
      END { if (uri != "" && hit) print uri }' "$file" | head -n 1
  done
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
    | sed -n "s/^deb \(\[[^]]*\] \)\{0,1\}\([^ ]*\) $suite .*/\2/p" || true
}

if ! have_image "$ROOTFS"; then
  command -v debootstrap >/dev/null || { log "debootstrap is required (apt-get install debootstrap)"; exit 1; }
  MIRROR=$(mirror_for bookworm | head -n 1)
  SECURITY=$(mirror_for bookworm-security | head -n 1)
  [ -n "$MIRROR" ] || { log "no Debian bookworm mirror found in /etc/apt/sources.list*"; exit 1; }
  DIR=$(mktemp -d /tmp/covid-spark-rootfs.XXXXXX)
  trap 'rm -rf "$DIR"' EXIT
  log "debootstrap --variant=minbase bookworm from $MIRROR (about 1.5 minutes)"
  start=$SECONDS
  debootstrap --variant=minbase --include=ca-certificates bookworm "$DIR" "$MIRROR" >"$DIR.log" 2>&1 \
    || { tail -n 20 "$DIR.log" >&2; rm -f "$DIR.log"; log "debootstrap failed (log above)"; exit 1; }
  rm -f "$DIR.log"
  {
    echo "deb $MIRROR bookworm main"
    echo "deb $MIRROR bookworm-updates main"
    [ -z "$SECURITY" ] || echo "deb $SECURITY bookworm-security main"
  } > "$DIR/etc/apt/sources.list"
  rm -rf "$DIR"/var/cache/apt/archives/*.deb "$DIR"/var/lib/apt/lists/*
  tar -C "$DIR" -c . | docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' - "$ROOTFS" >/dev/null
  rm -rf "$DIR"
  log "$ROOTFS imported in $((SECONDS - start)) s"
fi

CONTEXT=$(mktemp -d /tmp/covid-spark-base.XXXXXX)
trap 'rm -rf "$CONTEXT"' EXIT
start=$SECONDS
if [ "$STACK" = pinned ]; then
  cat > "$CONTEXT/Dockerfile" <<EOF
FROM $ROOTFS
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv python3-dev python-is-python3 \\
 && rm -rf /var/lib/apt/lists/* \\
 && python -c "import ssl, sqlite3, venv, sys; print(sys.version)"
EOF
else
  # A CPython 3.12 built on this same Debian release (pyenv's, as scripts/setup_env.sh finds it),
  # relocated to /usr/local where the official image keeps it; its test suite, IDLE and Tk left out.
  PYENV_PYTHON=${PYTHON312_PREFIX:-$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.* 2>/dev/null | sort -V | tail -n 1)}
  [ -x "$PYENV_PYTHON/bin/python3.12" ] || {
    log "no CPython 3.12 to copy (looked in ${PYENV_ROOT:-$HOME/.pyenv}/versions/3.12.*; set PYTHON312_PREFIX),"
    log "or build from an image that has it: BASE=python:3.12-slim-bookworm"
    exit 1
  }
  log "copying $PYENV_PYTHON into the image's /usr/local"
  mkdir "$CONTEXT/python"
  tar -C "$PYENV_PYTHON" -c --exclude=./lib/python3.12/test --exclude=./lib/python3.12/idlelib \
      --exclude=./lib/python3.12/tkinter --exclude=./lib/python3.12/turtledemo --exclude='*.a' \
      --exclude=./lib/python3.12/site-packages --exclude=./bin/idle* --exclude=./bin/pip* --exclude=./bin/2to3* . \
    | tar -C "$CONTEXT/python" -x
  cat > "$CONTEXT/Dockerfile" <<EOF
FROM $ROOTFS
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \\
      libssl3 libffi8 libsqlite3-0 libreadline8 libncursesw6 libbz2-1.0 liblzma5 zlib1g libuuid1 libgdbm6 libexpat1 \\
 && rm -rf /var/lib/apt/lists/*
COPY python/ /usr/local/
RUN ldconfig && python3.12 -m ensurepip >/dev/null \\
 && ln -sf python3.12 /usr/local/bin/python && ln -sf python3.12 /usr/local/bin/python3 \\
 && python -c "import ssl, sqlite3, ctypes, lzma, bz2, venv, sys; print(sys.version)"
EOF
fi
log "building $IMAGE"
docker build --network host -q -t "$IMAGE" "$CONTEXT" >/dev/null
log "$IMAGE built in $((SECONDS - start)) s"
echo "$IMAGE"
