#!/usr/bin/env bash
# Builds the binaries the e2e harness runs, from Go modules, into a cache:
#
#   $SPOOL_E2E_CACHE/k8s-<ver>/bin/        kube-apiserver kube-controller-manager
#                                          kube-scheduler kubelet kubectl etcd
#                                          + symlinks to the sidecars below
#   $SPOOL_E2E_CACHE/k8s-<ver>/crds/       symlink to the snapshot CRDs below
#   $SPOOL_E2E_CACHE/k8s-<ver>/versions.env   versions and paths, for sourcing
#   $SPOOL_E2E_CACHE/sidecars-<go.sum hash>/<repo>-<ver>/bin/<cmd>
#   $SPOOL_E2E_CACHE/sidecars-<go.sum hash>/external-snapshotter-<ver>/crds/*.yaml
#   $SPOOL_E2E_CACHE/snapshot-metadata-<hash>/bin/{csi-snapshot-metadata,spool-cbt-lister}
#   $SPOOL_E2E_CACHE/snapshot-metadata-<hash>/crds/  the SnapshotMetadataService CRD
#   $SPOOL_E2E_CACHE/helm-<ver>-<hash>/bin/helm   (make chart, the chart flavour)
#
# With --external it also builds e2e-storage.test (the External.Storage specs
# of the Kubernetes e2e suite), agnhost and the ginkgo CLI (make e2e-external).
#
# SPOOL_E2E_CACHE defaults to <repo>/.cache/e2e. Kubernetes and etcd come from
# the versions pinned in test/e2e/tools/go.mod, the sidecars from those pinned
# in test/e2e/tools/sidecars/go.mod (built together, in one module graph).
#
# A binary whose cached file exists is not rebuilt: delete it (or the whole
# cache directory) to force a rebuild. Outputs are written to a temporary name
# and renamed, so an interrupted build never leaves a half-written binary.
#
# Several runs may share a cache (CI starts one in the background, at low
# priority, while the unit tiers run): the cluster binaries and the --external
# ones are each built under a lock on the cache, so a second run waits for
# the first and then finds the binaries built.
#
# Exit status: 1 if any binary failed to build.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS_DIR=$REPO/test/e2e/tools
CACHE=${SPOOL_E2E_CACHE:-$REPO/.cache/e2e}

log() { printf '[e2e-tools] %s\n' "$*"; }
warn() { printf '[e2e-tools] WARNING: %s\n' "$*" >&2; }
die() { printf '[e2e-tools] ERROR: %s\n' "$*" >&2; exit 1; }

command -v go >/dev/null || die "go not found in PATH"
[ -f "$TOOLS_DIR/go.mod" ] || die "$TOOLS_DIR/go.mod is missing"

# module_version DIR MODULE: the version of MODULE that DIR's go.mod pins.
module_version() {
  (cd "$1" && go list -m -f '{{if .Replace}}{{.Replace.Version}}{{else}}{{.Version}}{{end}}' "$2") ||
    die "cannot read the version of $2 from $1/go.mod"
}

SIDECARS_MOD=$TOOLS_DIR/sidecars
[ -f "$SIDECARS_MOD/go.sum" ] || die "$SIDECARS_MOD/go.sum is missing"
K8S_VERSION=$(module_version "$TOOLS_DIR" k8s.io/kubernetes)
ETCD_VERSION=$(module_version "$TOOLS_DIR" go.etcd.io/etcd/server/v3)
[[ $K8S_VERSION =~ ^v([0-9]+)\.([0-9]+)\. ]] || die "unexpected Kubernetes version '$K8S_VERSION'"
K8S_MAJOR=${BASH_REMATCH[1]}
K8S_MINOR=${BASH_REMATCH[2]}

K8S_DIR=$CACHE/k8s-$K8S_VERSION
BIN=$K8S_DIR/bin
# Keyed by the sidecars module's go.sum: any dependency change rebuilds them.
SIDECARS=$CACHE/sidecars-$(sha256sum "$SIDECARS_MOD/go.sum" | cut -c1-12)
mkdir -p "$BIN" "$SIDECARS"

# lock NAME: waits for, then holds, the cache's lock NAME (on fd 9) until
# unlock. Another run of this script holding it is building the same binaries.
lock() {
  exec 9>"$CACHE/.lock-$1"
  if ! flock -n 9; then
    log "another hack/e2e-tools.sh is building the $1 binaries into $CACHE: waiting for it ..."
    local t0
    t0=$(date +%s.%N)
    flock 9
    log "... waited $(elapsed "$t0")s"
  fi
}
unlock() { exec 9>&-; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/spool-e2e-tools.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

SUMMARY=()
FAILED=()
T_START=$(date +%s.%N)

elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# build_many OUTDIR DIR LDFLAGS NAME=PACKAGE...: builds, in one `go build`
# in DIR, each PACKAGE whose OUTDIR/NAME does not exist yet (every binary of
# this script goes through here, one or several at a time), stripped (-s -w:
# no symbol table or DWARF; the links are faster and the binaries a third of
# the size; panics still print their stack traces), then moves each into
# OUTDIR/NAME. Records the time. Returns go build's status.
build_many() {
  local outdir=$1 dir=$2 ldflags=$3; shift 3
  local pair name pkg t0 rc=0 tmp names=() pkgs=()
  for pair in "$@"; do
    name=${pair%%=*} pkg=${pair#*=}
    if [ -x "$outdir/$name" ]; then
      SUMMARY+=("$(printf '%-24s cached   %s' "$name" "$outdir/$name")")
      log "$name: cached ($outdir/$name)"
    else
      names+=("$name") pkgs+=("$pkg")
    fi
  done
  [ ${#pkgs[@]} -gt 0 ] || return 0
  tmp=$(mktemp -d "$WORK/build.XXXXXX")
  log "${names[*]}: building ..."
  t0=$(date +%s.%N)
  (cd "$dir" && go build -trimpath -ldflags "$ldflags -s -w" -o "$tmp/" "${pkgs[@]}") >"$WORK/build.log" 2>&1 || rc=$?
  if [ $rc -ne 0 ]; then
    t0=$(elapsed "$t0")
    tail -n 30 "$WORK/build.log" >&2
    warn "${names[*]}: go build failed after ${t0}s (in $dir: go build ${pkgs[*]})"
    SUMMARY+=("$(printf '%-24s FAILED   after %ss' "${names[*]}" "$t0")")
    return $rc
  fi
  mkdir -p "$outdir"
  local i bin
  for i in "${!names[@]}"; do
    # go build names a binary after its package path's last element, or
    # the one before a major-version suffix (go.etcd.io/etcd/server/v3: server).
    bin=$(basename "${pkgs[$i]}")
    [[ $bin =~ ^v[0-9]+$ ]] && bin=$(basename "$(dirname "${pkgs[$i]}")")
    [ -f "$tmp/$bin" ] || { warn "go build left no $tmp/$bin for ${names[$i]}"; return 1; }
    mv -f "$tmp/$bin" "$outdir/${names[$i]}.tmp.$$"
    mv -f "$outdir/${names[$i]}.tmp.$$" "$outdir/${names[$i]}"
  done
  t0=$(elapsed "$t0")
  SUMMARY+=("$(printf '%-24s built    in %6ss' "${names[*]}" "$t0")")
  log "${names[*]}: built in ${t0}s -> $outdir"
}

# ---------------------------------------------------------------------------
# Kubernetes and etcd, from the tools module.
log "cache: $CACHE"
log "Kubernetes $K8S_VERSION, etcd $ETCD_VERSION (from $TOOLS_DIR/go.mod)"

lock cluster

K8S_LDFLAGS=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  K8S_LDFLAGS+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$K8S_MAJOR"
  K8S_LDFLAGS+=" -X $pkg.gitMinor=$K8S_MINOR -X $pkg.gitTreeState=clean"
done

# One go build for the Kubernetes commands and etcd: the packages they share
# are loaded and hashed once, and the links run side by side.
build_many "$BIN" "$TOOLS_DIR" "$K8S_LDFLAGS" \
  kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver \
  kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager \
  kube-scheduler=k8s.io/kubernetes/cmd/kube-scheduler \
  kubelet=k8s.io/kubernetes/cmd/kubelet \
  kubectl=k8s.io/kubernetes/cmd/kubectl \
  kube-proxy=k8s.io/kubernetes/cmd/kube-proxy \
  etcd=go.etcd.io/etcd/server/v3 ||
  die "Kubernetes $K8S_VERSION and etcd $ETCD_VERSION must build; see the output above"

# The harness's own helpers from the tools module: the plugin registrar that
# stands in for node-driver-registrar, and the pod sandbox (pause) binary.
# They are small and ours, so they are rebuilt every time (the Go build cache
# makes that a second).
for cmd in spool-registrar spool-livenessprobe pause; do
  rm -f "$BIN/$cmd"
  CGO_ENABLED=0 build_many "$BIN" "$TOOLS_DIR" "" "$cmd=./cmd/$cmd" ||
    die "$cmd must build; see the output above"
done

# ---------------------------------------------------------------------------
# CSI sidecars, from the sidecars module: one module graph for the four, so
# what they share (client-go, grpc, ...) is compiled once.
ENV_LINES=()

# sidecar REPO MODULE CMD...: builds each CMD of MODULE into
# $SIDECARS/REPO-<version>/bin and links it from $BIN.
sidecar() {
  local repo=$1 mod=$2; shift 2
  local ver dir cmd var
  ver=$(module_version "$SIDECARS_MOD" "$mod")
  dir=$SIDECARS/$repo-$ver
  var=$(tr 'a-z-' 'A-Z_' <<<"$repo")_VERSION
  ENV_LINES+=("$var=$ver")
  for cmd in "$@"; do
    if build_many "$dir/bin" "$SIDECARS_MOD" "-X main.version=$ver" "$cmd=$mod/cmd/$cmd"; then
      ln -sfn "../../$(basename "$SIDECARS")/$repo-$ver/bin/$cmd" "$BIN/$cmd"
    else
      FAILED+=("$cmd $ver")
    fi
  done
}

log "sidecars from $SIDECARS_MOD/go.mod"
sidecar external-provisioner github.com/kubernetes-csi/external-provisioner/v6 csi-provisioner
sidecar external-attacher github.com/kubernetes-csi/external-attacher/v4 csi-attacher
sidecar external-resizer github.com/kubernetes-csi/external-resizer/v2 csi-resizer
sidecar external-snapshotter github.com/kubernetes-csi/external-snapshotter/v8 csi-snapshotter snapshot-controller

# The snapshot CRDs, from the snapshotter's client module.
SNAP_VER=$(module_version "$SIDECARS_MOD" github.com/kubernetes-csi/external-snapshotter/v8)
CRDS=$SIDECARS/external-snapshotter-$SNAP_VER/crds
if [ ! -d "$CRDS" ]; then
  cdir=$(cd "$SIDECARS_MOD" && go mod download -json github.com/kubernetes-csi/external-snapshotter/client/v8 |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p') ||
    die "cannot download the snapshotter's client module (for the CRDs)"
  [ -d "$cdir/config/crd" ] || die "$cdir has no config/crd: no snapshot CRDs"
  mkdir -p "$CRDS.tmp.$$"
  # The CRDs only (not kustomization.yaml), so `kubectl apply -f crds/` works.
  cp "$cdir"/config/crd/*.storage.k8s.io_*.yaml "$CRDS.tmp.$$/"
  chmod u+w "$CRDS.tmp.$$"/*
  mv "$CRDS.tmp.$$" "$CRDS"
  log "snapshot CRDs copied to $CRDS"
fi
ln -sfn "../$(basename "$SIDECARS")/external-snapshotter-$SNAP_VER/crds" "$K8S_DIR/crds"

# Changed block tracking, from a module of its own (see its go.mod): the
# csi-snapshot-metadata sidecar, spool-cbt-lister (a backup client on
# upstream's client library) and the SnapshotMetadataService CRD.
CBT_MOD=$TOOLS_DIR/snapshot-metadata
[ -f "$CBT_MOD/go.sum" ] || die "$CBT_MOD/go.sum is missing"
CBT=$CACHE/snapshot-metadata-$(cat "$CBT_MOD/go.sum" "$CBT_MOD"/cmd/*/*.go | sha256sum | cut -c1-12)
CBT_VER=$(module_version "$CBT_MOD" github.com/kubernetes-csi/external-snapshot-metadata)
ENV_LINES+=("EXTERNAL_SNAPSHOT_METADATA_VERSION=$CBT_VER")
log "changed block tracking from $CBT_MOD/go.mod (external-snapshot-metadata $CBT_VER)"
if build_many "$CBT/bin" "$CBT_MOD" "-X main.version=$CBT_VER" \
  csi-snapshot-metadata=github.com/kubernetes-csi/external-snapshot-metadata/cmd/csi-snapshot-metadata \
  spool-cbt-lister=./cmd/spool-cbt-lister; then
  for cmd in csi-snapshot-metadata spool-cbt-lister; do
    ln -sfn "../../$(basename "$CBT")/bin/$cmd" "$BIN/$cmd"
  done
else
  FAILED+=("csi-snapshot-metadata $CBT_VER")
fi
if [ ! -d "$CBT/crds" ]; then
  cdir=$(cd "$CBT_MOD" && go mod download -json github.com/kubernetes-csi/external-snapshot-metadata/client |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p') ||
    die "cannot download external-snapshot-metadata's client module (for its CRD)"
  [ -f "$cdir/config/crd/cbt.storage.k8s.io_snapshotmetadataservices.yaml" ] ||
    die "$cdir has no SnapshotMetadataService CRD"
  mkdir -p "$CBT/crds.tmp.$$"
  cp "$cdir/config/crd/cbt.storage.k8s.io_snapshotmetadataservices.yaml" "$CBT/crds.tmp.$$/"
  chmod u+w "$CBT/crds.tmp.$$"/*
  mv "$CBT/crds.tmp.$$" "$CBT/crds"
  log "SnapshotMetadataService CRD copied to $CBT/crds"
fi
ln -sfn "../$(basename "$CBT")/crds" "$K8S_DIR/cbt-crds"

# Helm, from a module of its own (test/e2e/tools/helm): make chart lints and
# renders charts/spool with it, and the deploy tier installs a flavour with
# it.
HELM_MOD=$TOOLS_DIR/helm
[ -f "$HELM_MOD/go.sum" ] || die "$HELM_MOD/go.sum is missing"
HELM_VER=$(module_version "$HELM_MOD" helm.sh/helm/v4)
HELM_DIR=$CACHE/helm-$HELM_VER-$(sha256sum "$HELM_MOD/go.sum" | cut -c1-12)
ENV_LINES+=("HELM_VERSION=$HELM_VER")
log "helm $HELM_VER from $HELM_MOD/go.mod"
if build_many "$HELM_DIR/bin" "$HELM_MOD" "-X helm.sh/helm/v4/internal/version.version=$HELM_VER" \
  helm=helm.sh/helm/v4/cmd/helm; then
  ln -sfn "../../$(basename "$HELM_DIR")/bin/helm" "$BIN/helm"
else
  FAILED+=("helm $HELM_VER")
fi
if [ ${#FAILED[@]} -gt 0 ]; then die "builds failed: ${FAILED[*]}"; fi

# ---------------------------------------------------------------------------
{
  echo "# Written by hack/e2e-tools.sh; source it to find the e2e binaries."
  echo "K8S_VERSION=$K8S_VERSION"
  echo "ETCD_VERSION=$ETCD_VERSION"
  for l in "${ENV_LINES[@]}"; do echo "$l"; done
  echo "E2E_BIN=$BIN"
  [ -e "$K8S_DIR/crds" ] && echo "E2E_CRDS=$K8S_DIR/crds"
  [ -e "$K8S_DIR/cbt-crds" ] && echo "E2E_CBT_CRDS=$K8S_DIR/cbt-crds"
} >"$K8S_DIR/versions.env.tmp.$$"
mv -f "$K8S_DIR/versions.env.tmp.$$" "$K8S_DIR/versions.env"
unlock

# With --external: e2e-storage.test (the Kubernetes e2e suite's storage
# specs, for make e2e-external), the ginkgo CLI and agnhost (for its test
# image).
if [ "${1:-}" = --external ]; then
  lock external
  # Built like the cluster binaries (cgo on), so it reuses their compiled
  # packages: a static build recompiles them all (4 minutes cold). The
  # harness puts its libraries in the image.
  build_many "$BIN" "$TOOLS_DIR" "" agnhost=k8s.io/kubernetes/test/images/agnhost ||
    die "agnhost must build; see the output above"
  # The ginkgo CLI runs e2e.test in parallel processes.
  build_many "$BIN" "$TOOLS_DIR" "" ginkgo=github.com/onsi/ginkgo/v2/ginkgo ||
    die "ginkgo must build; see the output above"
  # e2e-storage.test: the Kubernetes e2e suite's framework and its
  # External.Storage specs only (test/e2e/tools/e2estorage), not every e2e
  # package: the same specs, a third less to compile and link. Ours, so
  # rebuilt every time like the helpers above (the Go build cache makes
  # that a few seconds); the ginkgo CLI wants the .test suffix.
  rm -f "$BIN/e2e-storage.test"
  log "e2e-storage.test: building ..."
  t0=$(date +%s.%N)
  (cd "$TOOLS_DIR" && go test -c -trimpath -ldflags "$K8S_LDFLAGS -s -w" -o "$BIN/e2e-storage.test.tmp.$$" ./e2estorage) \
    >"$WORK/e2e-storage.test.log" 2>&1 || {
    tail -n 30 "$WORK/e2e-storage.test.log" >&2
    rm -f "$BIN/e2e-storage.test.tmp.$$"
    die "e2e-storage.test must build"
  }
  mv -f "$BIN/e2e-storage.test.tmp.$$" "$BIN/e2e-storage.test"
  SUMMARY+=("$(printf '%-24s built    in %6ss' e2e-storage.test "$(elapsed "$t0")")")
  unlock
fi

log "summary:"
for l in "${SUMMARY[@]}"; do log "  $l"; done
log "total $(elapsed "$T_START")s; binaries in $BIN; versions in $K8S_DIR/versions.env"
exit 0
