#!/usr/bin/env bash
# Builds the test cluster's binaries from the Go module proxy with this machine's Go toolchain:
# kube-apiserver, kube-controller-manager, kube-scheduler (k8s.io/kubernetes), etcd, kwok and helm.
# Cached by version under $MLAAS_K8S_CACHE (default ~/.cache/mlaas-k8s): a second run is instant.
# Usage: tests/cluster/build.sh   -> prints the directory holding the binaries
set -euo pipefail

KUBERNETES_VERSION=${KUBERNETES_VERSION:-v1.33.13}
ETCD_VERSION=${ETCD_VERSION:-v3.5.35}
KWOK_VERSION=${KWOK_VERSION:-v0.7.0}
HELM_VERSION=${HELM_VERSION:-v3.21.4}

CACHE=${MLAAS_K8S_CACHE:-$HOME/.cache/mlaas-k8s}
OUT="$CACHE/k8s-$KUBERNETES_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION-helm-$HELM_VERSION"
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler etcd kwok helm)

have_all() { for b in "${BINARIES[@]}"; do [ -x "$OUT/bin/$b" ] || return 1; done; }
if have_all; then echo "$OUT/bin"; exit 0; fi

export PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null || { echo "Go is needed to build the test cluster (Debian: apt-get install golang)" >&2; exit 1; }
go_minor=$(go env GOVERSION | sed -E 's/^go1\.([0-9]+).*/\1/')
if [ "${go_minor:-0}" -lt 24 ]; then
  echo "Go $(go env GOVERSION) is too old: Kubernetes $KUBERNETES_VERSION needs Go 1.24 or newer" >&2; exit 1
fi
mkdir -p "$OUT/bin" "$OUT/src"
log() { echo "[$(date +%T)] $*" >&2; }
export GOFLAGS=-mod=mod CGO_ENABLED=0

# --- Kubernetes control plane: k8s.io/kubernetes with its staging modules at their published versions
K8S_MINOR_TAG="v0.${KUBERNETES_VERSION#v1.}"   # v1.33.13 -> v0.33.13
src="$OUT/src/kubernetes"; mkdir -p "$src"; cd "$src"
if [ ! -f go.mod ]; then
  go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" >/dev/null
  modfile="$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/$KUBERNETES_VERSION.mod"
  gover=$(awk '/^go /{print $2; exit}' "$modfile")
  {
    echo "module mlaas.test/kubernetes"
    echo "go $gover"
    echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
    echo "replace ("
    awk '$1 ~ /^k8s.io\// && $2 == "v0.0.0" {print "\t" $1 " => " $1 " '"$K8S_MINOR_TAG"'"}' "$modfile"
    echo ")"
  } > go.mod
  cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
)
GO
  go mod tidy >/dev/null 2>&1 || go mod download
fi
ldflags="-s -w"
for v in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $v.gitVersion=$KUBERNETES_VERSION -X $v.gitMajor=1 -X $v.gitMinor=$(echo "$KUBERNETES_VERSION" | cut -d. -f2)"
  ldflags+=" -X $v.gitTreeState=clean -X $v.buildDate=1970-01-01T00:00:00Z"
done
log "building kube-apiserver, kube-controller-manager, kube-scheduler $KUBERNETES_VERSION"
go build -trimpath -ldflags "$ldflags" -o "$OUT/bin/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler

# --- etcd: its server package behind a two-line main (the etcd module itself uses replace lines)
src="$OUT/src/etcd"; mkdir -p "$src"; cd "$src"
if [ ! -f go.mod ]; then
  cat > go.mod <<GOMOD
module mlaas.test/etcd
go 1.23
require go.etcd.io/etcd/server/v3 $ETCD_VERSION
GOMOD
  cat > main.go <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  go mod tidy >/dev/null 2>&1 || go mod download
fi
log "building etcd $ETCD_VERSION"
go build -trimpath -ldflags "-s -w" -o "$OUT/bin/etcd" .

# --- kwok and helm: plain modules
log "building kwok $KWOK_VERSION"
GOBIN="$OUT/bin" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
log "building helm $HELM_VERSION"
GOBIN="$OUT/bin" go install -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"

have_all || { echo "build incomplete in $OUT/bin" >&2; exit 1; }
echo "$OUT/bin"
