#!/usr/bin/env bash
# Builds the Go programs of the upstream charts' images, at the versions those images hold, from
# the Go module proxy, for the test clusters' kubelet (tests/cluster/images.py):
#   traefik v3.3.5          Dask Gateway 2026.3.0's proxy (docker.io/traefik:3.3.5)
#   kube-scheduler v1.30.14 Zero to JupyterHub 4.4.0's user scheduler (registry.k8s.io/kube-scheduler:v1.30.14)
# Cached under $MLAAS_K8S_CACHE (default ~/.cache/mlaas-k8s): a second run is instant.
# Usage: tests/cluster/build_images.sh   -> prints the directory holding the binaries
set -euo pipefail

TRAEFIK_VERSION=${TRAEFIK_VERSION:-v3.3.5}
USER_SCHEDULER_VERSION=${USER_SCHEDULER_VERSION:-v1.30.14}
CACHE=${MLAAS_K8S_CACHE:-$HOME/.cache/mlaas-k8s}
OUT="$CACHE/images-traefik-$TRAEFIK_VERSION-kube-scheduler-$USER_SCHEDULER_VERSION"
if [ -x "$OUT/bin/traefik" ] && [ -x "$OUT/bin/kube-scheduler" ]; then echo "$OUT/bin"; exit 0; fi

export PATH="$PATH:/usr/local/go/bin" CGO_ENABLED=0 GOFLAGS=-mod=mod
command -v go >/dev/null || { echo "Go is needed (Debian: apt-get install golang)" >&2; exit 1; }
log() { echo "[$(date +%T)] $*" >&2; }
mkdir -p "$OUT/bin"

# --- traefik: its module has replace lines, so it is built inside its own source tree
if [ ! -x "$OUT/bin/traefik" ]; then
  log "building traefik $TRAEFIK_VERSION"
  dir=$(go mod download -json "github.com/traefik/traefik/v3@$TRAEFIK_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  rm -rf "$OUT/src/traefik"; mkdir -p "$OUT/src"
  cp -r "$dir" "$OUT/src/traefik"; chmod -R u+w "$OUT/src/traefik"
  (cd "$OUT/src/traefik" && go build -trimpath \
    -ldflags "-s -w -X github.com/traefik/traefik/v3/pkg/version.Version=$TRAEFIK_VERSION" -o "$OUT/bin/traefik" ./cmd/traefik)
  rm -rf "$OUT/src/traefik"
fi

# --- kube-scheduler: k8s.io/kubernetes with its staging modules at their published versions
if [ ! -x "$OUT/bin/kube-scheduler" ]; then
  log "building kube-scheduler $USER_SCHEDULER_VERSION"
  minor_tag="v0.${USER_SCHEDULER_VERSION#v1.}"
  src="$OUT/src/kube-scheduler"; mkdir -p "$src"; cd "$src"
  go mod download -json "k8s.io/kubernetes@$USER_SCHEDULER_VERSION" >/dev/null
  modfile="$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/$USER_SCHEDULER_VERSION.mod"
  {
    echo "module mlaas.test/user-scheduler"
    echo "go $(awk '/^go /{print $2; exit}' "$modfile")"
    echo "require k8s.io/kubernetes $USER_SCHEDULER_VERSION"
    echo "replace ("
    awk '$1 ~ /^k8s.io\// && $2 == "v0.0.0" {print "\t" $1 " => " $1 " '"$minor_tag"'"}' "$modfile"
    echo ")"
  } > go.mod
  printf '//go:build tools\n\npackage tools\n\nimport _ "k8s.io/kubernetes/cmd/kube-scheduler"\n' > tools.go
  go mod tidy >/dev/null 2>&1 || go mod download
  ldflags="-s -w"
  for v in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $v.gitVersion=$USER_SCHEDULER_VERSION -X $v.gitMajor=1 -X $v.gitMinor=$(echo "$USER_SCHEDULER_VERSION" | cut -d. -f2)"
  done
  go build -trimpath -ldflags "$ldflags" -o "$OUT/bin/kube-scheduler" k8s.io/kubernetes/cmd/kube-scheduler
  cd /; rm -rf "$src"
fi
echo "$OUT/bin"
