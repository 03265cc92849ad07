#!/usr/bin/env bash
# Fills docker/pip-local/ (ignored by git) with this host's pip settings for a *test* build of Dockerfile.cpu:
# the CA bundle pip trusts, its index URLs (http/https only: file:// stores are not visible inside a build) and
# the CPU torch 2.13.0 wheel when it lies in a local wheel store.
# Usage: docker/pip-local.sh [PIP]   (PIP: the pip to ask, default `python3 -m pip`)
set -euo pipefail
PIP=${1:-python3 -m pip}
if [ -x "${1:-}" ]; then PIP=$(realpath "$1"); fi
cd "$(dirname "$0")/pip-local"
# written to new/ first; a file whose content did not change keeps its date, so that the build's cache holds
new=$(mktemp -d new.XXXXXX)
trap 'rm -rf "$new"' EXIT

setting() {  # the value pip uses for KEY: the PIP_* environment first, then pip config
  local key=$1 env=PIP_$(echo "$1" | tr a-z- A-Z_)
  if [ -n "${!env:-}" ]; then echo "${!env}"; return; fi
  $PIP config list 2>/dev/null | sed -n "s/^[a-z:]*\.$key='\(.*\)'$/\1/p" | tail -1
}

{
  echo "[global]"
  cert=$(setting cert)
  if [ -n "$cert" ] && [ -f "$cert" ]; then cp "$cert" "$new/ca-bundle.crt"; echo "cert = /tmp/pip-local/ca-bundle.crt"; fi
  index=$(setting index-url)
  [ -n "$index" ] && case $index in http*) echo "index-url = $index";; esac
  extra=$(for url in $(setting extra-index-url); do case $url in http*) echo -n "$url ";; esac; done)
  [ -n "$extra" ] && echo "extra-index-url = $extra"
  trusted=$(setting trusted-host); [ -n "$trusted" ] && echo "trusted-host = $trusted"
  timeout=$(setting default-timeout); [ -n "$timeout" ] && echo "timeout = $timeout"
  echo "find-links = /tmp/pip-local/wheels"
} > "$new/pip.conf"

# the CPU build of torch, when this host's pip finds it in a local wheel store (its find-links folders); without
# it the build takes torch from the TORCH_INDEX_URL of Dockerfile.cpu (PyTorch's CPU index)
mkdir -p "$new/wheels"
for dir in $(setting find-links); do
  dir=${dir#file://}
  for wheel in "$dir"/torch-2.13.0+cpu-cp311-*.whl; do
    [ -f "$wheel" ] && { cp -l "$wheel" "$new/wheels/" 2>/dev/null || cp "$wheel" "$new/wheels/"; }
  done
done

# drop what is gone, then replace what changed
generated=$(cd "$new" && find . -type f)
find . -type f ! -name README.md ! -path "./$new/*" | while read -r file; do
  grep -qxF "$file" <<<"$generated" || rm -f "$file"
done
for file in $generated; do
  cmp -s "$new/$file" "$file" || { mkdir -p "$(dirname "$file")"; mv -f "$new/$file" "$file"; }
done
ls wheels
