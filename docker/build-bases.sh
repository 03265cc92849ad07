#!/usr/bin/env bash
# Base images made from Debian's own packages, for hosts that cannot pull from the public image registry.
#
#   docker/build-bases.sh            # builds all three (skips an image that already exists; FORCE=1 rebuilds)
#
# fsmllm-base/python:bookworm  - stands in for python:3.11-slim: Debian bookworm (minbase) with python3 3.11 in a
#                                venv at /opt/venv that is first on PATH (so `python` and `pip` work as in the
#                                public image); build with --build-arg BASE=fsmllm-base/python:bookworm
# fsmllm-base/nginx:bookworm   - stands in for nginx:*-alpine: Debian's nginx, logging to the container's stdout
#                                and stderr, `nginx -g 'daemon off;'` as its command
# fsmllm-base/debian:bookworm  - stands in for debian:bookworm-slim: Debian bookworm (minbase), the base of
#                                docker/Dockerfile.postgres (which apt-get installs postgresql)
#
# Needs root, debootstrap (apt-get install debootstrap) and a Debian mirror (MIRROR, default deb.debian.org).
set -euo pipefail

MIRROR=${MIRROR:-http://deb.debian.org/debian}
SUITE=${SUITE:-bookworm}
PYTHON_IMAGE=${PYTHON_IMAGE:-fsmllm-base/python:$SUITE}
NGINX_IMAGE=${NGINX_IMAGE:-fsmllm-base/nginx:$SUITE}
DEBIAN_IMAGE=${DEBIAN_IMAGE:-fsmllm-base/debian:$SUITE}
PATH_DEFAULT=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 1; }

exists() { docker image inspect "$1" >/dev/null 2>&1 && [ -z "${FORCE:-}" ]; }

# debootstrap DIR PACKAGES: a minimal root filesystem, apt lists and caches removed
rootfs() {
  local dir=$1 packages=$2
  debootstrap --variant=minbase --include="$packages" "$SUITE" "$dir" "$MIRROR" >"$dir.log" 2>&1 \
    || { tail -20 "$dir.log" >&2; exit 1; }
  # the suite's security and point-release updates, which debootstrap alone does not apply
  cat >"$dir/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb ${SECURITY_MIRROR:-${MIRROR%/debian}/debian-security} $SUITE-security main
EOF
  chroot "$dir" apt-get update -q >>"$dir.log" 2>&1
  DEBIAN_FRONTEND=noninteractive chroot "$dir" apt-get upgrade -y -q >>"$dir.log" 2>&1
  chroot "$dir" apt-get clean
  rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/var/log/* "$dir"/usr/share/doc/* \
         "$dir"/usr/share/man/* "$dir"/usr/share/info/*
}

work=$(mktemp -d /tmp/fsmllm-bases.XXXXXX)
trap 'rm -rf "$work"' EXIT

if exists "$PYTHON_IMAGE"; then
  echo "$PYTHON_IMAGE exists"
else
  started=$(date +%s)
  rootfs "$work/python" python3,python3-venv,ca-certificates
  chroot "$work/python" python3 -m venv /opt/venv
  chroot "$work/python" /opt/venv/bin/python -m pip --version >/dev/null
  tar -C "$work/python" -c . | docker import \
    -c "ENV PATH=/opt/venv/bin:$PATH_DEFAULT" -c "ENV LANG=C.UTF-8" -c 'CMD ["python3"]' \
    -m "Debian $SUITE minbase + python3 venv (fsmllm docker/build-bases.sh)" - "$PYTHON_IMAGE" >/dev/null
  echo "$PYTHON_IMAGE built in $(( $(date +%s) - started )) s"
fi

if exists "$NGINX_IMAGE"; then
  echo "$NGINX_IMAGE exists"
else
  started=$(date +%s)
  rootfs "$work/nginx" nginx,ca-certificates
  mkdir -p "$work/nginx/var/log/nginx"
  ln -sf /dev/stdout "$work/nginx/var/log/nginx/access.log"
  ln -sf /dev/stderr "$work/nginx/var/log/nginx/error.log"
  tar -C "$work/nginx" -c . | docker import \
    -c "ENV PATH=$PATH_DEFAULT" -c 'EXPOSE 80' -c 'CMD ["nginx", "-g", "daemon off;"]' \
    -m "Debian $SUITE minbase + nginx (fsmllm docker/build-bases.sh)" - "$NGINX_IMAGE" >/dev/null
  echo "$NGINX_IMAGE built in $(( $(date +%s) - started )) s"
fi

if exists "$DEBIAN_IMAGE"; then
  echo "$DEBIAN_IMAGE exists"
else
  started=$(date +%s)
  rootfs "$work/debian" ca-certificates
  tar -C "$work/debian" -c . | docker import -c "ENV PATH=$PATH_DEFAULT" -c 'CMD ["bash"]' \
    -m "Debian $SUITE minbase (fsmllm docker/build-bases.sh)" - "$DEBIAN_IMAGE" >/dev/null
  echo "$DEBIAN_IMAGE built in $(( $(date +%s) - started )) s"
fi
