#!/usr/bin/env bash
# make test-docker: build the CPU image, the gateway and the PostgreSQL image, start the compose stack (REPLICAS
# fsmllm replicas behind the nginx TLS gateway, sharing the certificate store in PostgreSQL) and run
# tests/deploy/docker through it; everything is torn down whatever happens.
#
# Needs root on Debian: installs docker.io, docker-compose, debootstrap, chromium and openssl when missing, and
# starts dockerd (vfs storage) when none answers (and stops it again at the end).
# Environment:
#   REPLICAS=2            fsmllm replicas (1 = the reduced form: the failover test is skipped)
#   FSMLLM_BASE_IMAGE / FSMLLM_GATEWAY_BASE_IMAGE / FSMLLM_POSTGRES_BASE_IMAGE   base images; by default the
#                         public ones when they can be pulled, otherwise fsmllm-base/{python,nginx,debian}:bookworm
#                         made by docker/build-bases.sh
#   PYTEST_ARGS           extra pytest arguments (e.g. -k failover)
#   KEEP_STACK=1          leave the stack running after the tests (for debugging; tear down with
#                         docker-compose -p fsmllm-test -f docker/docker-compose.yml down -v)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0 COMPOSE_PROJECT_NAME=fsmllm-test
# creating a container copies the whole 2.4 GB image on the vfs driver: over compose's 60 s default on a busy machine
export COMPOSE_HTTP_TIMEOUT=${COMPOSE_HTTP_TIMEOUT:-600}
REPLICAS=${REPLICAS:-2}
OUT=$ROOT/build/test-docker
PY=$ROOT/.venv/bin/python
mkdir -p "$OUT"
rm -f "$OUT/figures.json" "$OUT/build-cpu.log"
log() { echo "[test-docker $(date +%H:%M:%S)] $*"; }
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }
figure() {  # figure NAME VALUE: recorded in build/test-docker/figures.json, where the tests add theirs
  python3 - "$OUT/figures.json" "$1" "$2" <<'EOF'
import json, os, sys
path, name, value = sys.argv[1:]
figures = json.load(open(path)) if os.path.exists(path) else {}
try:
    value = json.loads(value)
except ValueError:
    pass
figures[name] = value
json.dump(figures, open(path, "w"), indent=2)
EOF
}

# --- tools
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v chromium >/dev/null || missing+=(chromium)
command -v openssl >/dev/null || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "${missing[@]}" >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
fi

# --- the daemon
DOCKERD_PID=
if ! docker info >/dev/null 2>&1; then
  log "starting dockerd (vfs storage)"
  nice -n 10 dockerd --storage-driver=vfs >"$OUT/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -20 "$OUT/dockerd.log"; exit 1; }
fi

CERTS=$(mktemp -d /tmp/fsmllm-certs.XXXXXX)
compose() { FSMLLM_CERTS_DIR=$CERTS FSMLLM_HTTPS_PUBLISH=127.0.0.1: FSMLLM_HTTP_PUBLISH=127.0.0.1: \
            FSMLLM_API_KEY=${FSMLLM_API_KEY:-test-key} docker-compose -f docker/docker-compose.yml "$@"; }
teardown() {
  status=$?
  set +e   # every step of the teardown is tried, whatever the one before it did
  if [ -z "${KEEP_STACK:-}" ]; then
    log "tearing down"
    compose logs --no-color >"$OUT/stack.log" 2>&1 || true
    compose down --volumes --remove-orphans --timeout 60 >/dev/null 2>&1 || true
    # what compose left (a removal still in progress on the vfs driver, an interrupted run): bounded retries
    label="label=com.docker.compose.project=$COMPOSE_PROJECT_NAME"
    for _ in $(seq 90); do
      containers=$(docker ps -aq --filter "$label"); networks=$(docker network ls -q --filter "$label")
      volumes=$(docker volume ls -q --filter "$label")
      [ -z "$containers$networks$volumes" ] && break
      [ -n "$containers" ] && { docker rm -f $containers >/dev/null 2>&1 || true; }
      [ -n "$networks" ] && { docker network rm $networks >/dev/null 2>&1 || true; }
      [ -n "$volumes" ] && { docker volume rm $volumes >/dev/null 2>&1 || true; }
      sleep 2
    done
    left=$(docker ps -aq --filter "$label"; docker network ls -q --filter "$label"; docker volume ls -q --filter "$label")
    [ -z "$left" ] || echo "test-docker: could not remove $(echo $left)" >&2
    rm -rf "$CERTS"
    # earlier builds' layers (the vfs storage driver keeps a full copy of the filesystem per layer)
    docker image prune -f >/dev/null 2>&1 || true
    if [ -n "$DOCKERD_PID" ]; then kill "$DOCKERD_PID" 2>/dev/null; wait "$DOCKERD_PID" 2>/dev/null || true; fi
  fi
  [ -f "$OUT/figures.json" ] && { log "figures ($OUT/figures.json):"; cat "$OUT/figures.json"; echo; }
  exit $status
}
trap teardown EXIT
trap 'exit 130' INT TERM
# a stack left by an interrupted run
compose down --volumes --remove-orphans --timeout 10 >/dev/null 2>&1 || true

# --- base images: the public ones when the registry answers, otherwise made from Debian packages
pullable() { docker image inspect "$1" >/dev/null 2>&1 || timeout 60 docker pull -q "$1" >/dev/null 2>&1; }
if [ -z "${FSMLLM_BASE_IMAGE:-}" ] || [ -z "${FSMLLM_GATEWAY_BASE_IMAGE:-}" ] || [ -z "${FSMLLM_POSTGRES_BASE_IMAGE:-}" ]; then
  if pullable python:3.11-slim && pullable nginx:1.27-alpine && pullable debian:bookworm-slim; then
    FSMLLM_BASE_IMAGE=${FSMLLM_BASE_IMAGE:-python:3.11-slim}
    FSMLLM_GATEWAY_BASE_IMAGE=${FSMLLM_GATEWAY_BASE_IMAGE:-nginx:1.27-alpine}
    FSMLLM_POSTGRES_BASE_IMAGE=${FSMLLM_POSTGRES_BASE_IMAGE:-debian:bookworm-slim}
  else
    log "the public registry cannot be reached: base images from Debian packages (docker/build-bases.sh)"
    started=$(now)
    docker/build-bases.sh
    figure bases_build_s "$(since "$started")"
    FSMLLM_BASE_IMAGE=${FSMLLM_BASE_IMAGE:-fsmllm-base/python:bookworm}
    FSMLLM_GATEWAY_BASE_IMAGE=${FSMLLM_GATEWAY_BASE_IMAGE:-fsmllm-base/nginx:bookworm}
    FSMLLM_POSTGRES_BASE_IMAGE=${FSMLLM_POSTGRES_BASE_IMAGE:-fsmllm-base/debian:bookworm}
  fi
fi
export FSMLLM_BASE_IMAGE FSMLLM_GATEWAY_BASE_IMAGE FSMLLM_POSTGRES_BASE_IMAGE
figure base_image "\"$FSMLLM_BASE_IMAGE\""
figure gateway_base_image "\"$FSMLLM_GATEWAY_BASE_IMAGE\""
figure postgres_base_image "\"$FSMLLM_POSTGRES_BASE_IMAGE\""

# --- images. This host's pip settings go into the build stage only (docker/pip-local/, ignored by git).
docker/pip-local.sh "$ROOT/.venv/bin/pip" >/dev/null
torch_index=()
ls docker/pip-local/wheels/torch-*.whl >/dev/null 2>&1 && torch_index=(--build-arg TORCH_INDEX_URL=)
cached=$(docker image inspect fsmllm:cpu-build >/dev/null 2>&1 && echo true || echo false)
log "building fsmllm:cpu on $FSMLLM_BASE_IMAGE (an earlier build's layers exist: $cached)"
started=$(now)
# the build stage is tagged too (fsmllm:cpu-build, never published), so that its layers stay a cache that
# `docker image prune` below leaves alone
for target in build ""; do
  nice -n 10 docker build --force-rm -f docker/Dockerfile.cpu --build-arg "BASE=$FSMLLM_BASE_IMAGE" "${torch_index[@]}" \
    ${target:+--target "$target"} -t "fsmllm:cpu${target:+-$target}" . >>"$OUT/build-cpu.log" 2>&1 \
    || { tail -40 "$OUT/build-cpu.log"; exit 1; }
done
figure cpu_build_s "$(since "$started")"
figure cpu_build_had_layers "$cached"
started=$(now)
nice -n 10 docker build --force-rm -f docker/Dockerfile.gateway --build-arg "BASE=$FSMLLM_GATEWAY_BASE_IMAGE" \
  -t fsmllm-gateway . >"$OUT/build-gateway.log" 2>&1 || { tail -40 "$OUT/build-gateway.log"; exit 1; }
figure gateway_build_s "$(since "$started")"
started=$(now)
# Debian's postgresql from the base's own apt sources (the build reaches the mirror as the host does)
nice -n 10 docker build --force-rm -f docker/Dockerfile.postgres --build-arg "BASE=$FSMLLM_POSTGRES_BASE_IMAGE" \
  -t fsmllm-postgres . >"$OUT/build-postgres.log" 2>&1 || { tail -40 "$OUT/build-postgres.log"; exit 1; }
figure postgres_build_s "$(since "$started")"
figure cpu_image_bytes "$(docker image inspect -f '{{.Size}}' fsmllm:cpu)"
figure gateway_image_bytes "$(docker image inspect -f '{{.Size}}' fsmllm-gateway)"
figure postgres_image_bytes "$(docker image inspect -f '{{.Size}}' fsmllm-postgres)"

# --- certificate (self-signed, for this run only) and the stack
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=localhost" \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -keyout "$CERTS/fsmllm.key" -out "$CERTS/fsmllm.crt" >/dev/null 2>&1
chmod 644 "$CERTS/fsmllm.key"   # read by nginx's master (root) only, but the folder is mounted read-only as is
log "starting the stack: $REPLICAS replicas behind the gateway, sharing PostgreSQL"
started=$(now)
compose up -d --no-build --scale "fsmllm=$REPLICAS" >"$OUT/up.log" 2>&1 || { cat "$OUT/up.log"; compose logs --tail 50; exit 1; }
figure stack_up_s "$(since "$started")"
https_port=$(compose port gateway 443 | sed 's/.*://')
http_port=$(compose port gateway 80 | sed 's/.*://')

log "testing through https://127.0.0.1:$https_port"
FSMLLM_STACK_URL=https://127.0.0.1:$https_port FSMLLM_STACK_HTTP_URL=http://127.0.0.1:$http_port \
FSMLLM_STACK_CA=$CERTS/fsmllm.crt FSMLLM_STACK_API_KEY=${FSMLLM_API_KEY:-test-key} \
FSMLLM_STACK_PROJECT=$COMPOSE_PROJECT_NAME FSMLLM_STACK_REPLICAS=$REPLICAS FSMLLM_STACK_FIGURES=$OUT/figures.json \
HF_HUB_OFFLINE=1 "$ROOT/.venv/bin/pytest" tests/deploy/docker -p no:cacheprovider ${PYTEST_ARGS:-}
