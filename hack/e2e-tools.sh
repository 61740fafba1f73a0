#!/usr/bin/env bash
# Builds the binaries the e2e harness runs, from Go modules, into a cache:
#
#   $SPOOL_E2E_CACHE/k8s-<ver>/bin/        kube-apiserver kube-controller-manager
#                                          kube-scheduler kubelet kubectl etcd
#                                          + symlinks to the sidecars below
#   $SPOOL_E2E_CACHE/k8s-<ver>/crds/       symlink to the snapshot CRDs below
#   $SPOOL_E2E_CACHE/k8s-<ver>/versions.env   versions and paths, for sourcing
#   $SPOOL_E2E_CACHE/sidecars/<repo>-<ver>/bin/<cmd>
#   $SPOOL_E2E_CACHE/sidecars/external-snapshotter-<ver>/crds/*.yaml
#
# With --external it also builds e2e.test, agnhost and the ginkgo CLI (make
# e2e-external).
#
# SPOOL_E2E_CACHE defaults to <repo>/.cache/e2e. Kubernetes and etcd come from
# the versions pinned in test/e2e/tools/go.mod. The sidecars are the newest
# release of their major version that the Go module proxy serves, unless
# pinned with CSI_PROVISIONER_VERSION, CSI_ATTACHER_VERSION,
# CSI_RESIZER_VERSION or CSI_SNAPSHOTTER_VERSION (e.g. v6.4.0). When the proxy
# cannot be asked, the newest version already in the cache is used.
#
# A binary whose cached file exists is not rebuilt: delete it (or the whole
# cache directory) to force a rebuild. Outputs are written to a temporary name
# and renamed, so an interrupted build never leaves a half-written binary.
#
# Exit status: 1 if a Kubernetes/etcd binary failed (they must build) or a
# sidecar build failed; a sidecar module the proxy does not serve is skipped
# with a warning and does not fail the script.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS_DIR=$REPO/test/e2e/tools
CACHE=${SPOOL_E2E_CACHE:-$REPO/.cache/e2e}

log() { printf '[e2e-tools] %s\n' "$*"; }
warn() { printf '[e2e-tools] WARNING: %s\n' "$*" >&2; }
die() { printf '[e2e-tools] ERROR: %s\n' "$*" >&2; exit 1; }

command -v go >/dev/null || die "go not found in PATH"
[ -f "$TOOLS_DIR/go.mod" ] || die "$TOOLS_DIR/go.mod is missing"

# Module version pinned in the tools module (no network: the go.mod says it).
tools_version() {
  (cd "$TOOLS_DIR" && go list -m -f '{{if .Replace}}{{.Replace.Version}}{{else}}{{.Version}}{{end}}' "$1") ||
    die "cannot read the version of $1 from $TOOLS_DIR/go.mod"
}

K8S_VERSION=$(tools_version k8s.io/kubernetes)
ETCD_VERSION=$(tools_version go.etcd.io/etcd/server/v3)
[[ $K8S_VERSION =~ ^v([0-9]+)\.([0-9]+)\. ]] || die "unexpected Kubernetes version '$K8S_VERSION'"
K8S_MAJOR=${BASH_REMATCH[1]}
K8S_MINOR=${BASH_REMATCH[2]}

K8S_DIR=$CACHE/k8s-$K8S_VERSION
BIN=$K8S_DIR/bin
SIDECARS=$CACHE/sidecars
mkdir -p "$BIN" "$SIDECARS"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/spool-e2e-tools.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

SUMMARY=()
FAILED=()
SKIPPED=()
T_START=$(date +%s.%N)

elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# build_into OUT DIR -- GO BUILD ARGS...: runs `go build -o tmp ARGS` in DIR,
# then renames tmp to OUT. Records the time. Returns go build's status.
build_into() {
  local out=$1 dir=$2; shift 3
  local name t0 tmp rc=0
  name=$(basename "$out")
  if [ -x "$out" ]; then
    SUMMARY+=("$(printf '%-24s cached   %s' "$name" "$out")")
    log "$name: cached ($out)"
    return 0
  fi
  mkdir -p "$(dirname "$out")"
  tmp=$out.tmp.$$
  log "$name: building ..."
  t0=$(date +%s.%N)
  (cd "$dir" && go build -trimpath -o "$tmp" "$@") >"$WORK/$name.log" 2>&1 || rc=$?
  if [ $rc -ne 0 ]; then
    rm -f "$tmp"
    t0=$(elapsed "$t0")
    tail -n 30 "$WORK/$name.log" >&2
    warn "$name: go build failed after ${t0}s (in $dir: go build $*)"
    SUMMARY+=("$(printf '%-24s FAILED   after %ss' "$name" "$t0")")
    return $rc
  fi
  mv -f "$tmp" "$out"
  t0=$(elapsed "$t0")
  SUMMARY+=("$(printf '%-24s built    in %6ss' "$name" "$t0")")
  log "$name: built in ${t0}s -> $out"
}

# ---------------------------------------------------------------------------
# Kubernetes and etcd, from the tools module.
log "cache: $CACHE"
log "Kubernetes $K8S_VERSION, etcd $ETCD_VERSION (from $TOOLS_DIR/go.mod)"

K8S_LDFLAGS=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  K8S_LDFLAGS+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$K8S_MAJOR"
  K8S_LDFLAGS+=" -X $pkg.gitMinor=$K8S_MINOR -X $pkg.gitTreeState=clean"
done

for cmd in kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl kube-proxy; do
  build_into "$BIN/$cmd" "$TOOLS_DIR" -- -ldflags "$K8S_LDFLAGS" "k8s.io/kubernetes/cmd/$cmd" ||
    die "$cmd $K8S_VERSION must build; see the output above"
done
build_into "$BIN/etcd" "$TOOLS_DIR" -- go.etcd.io/etcd/server/v3 ||
  die "etcd $ETCD_VERSION must build; see the output above (fallback: Debian's etcd-server package)"

# With --external: e2e.test (the Kubernetes e2e suite, for make
# e2e-external) and agnhost (for its test image), cached like the rest.
if [ "${1:-}" = --external ]; then
  # Built like the cluster binaries (cgo on), so it reuses their compiled
  # packages: a static build recompiles them all (4 minutes cold). The
  # harness puts its libraries in the image.
  build_into "$BIN/agnhost" "$TOOLS_DIR" -- k8s.io/kubernetes/test/images/agnhost ||
    die "agnhost must build; see the output above"
  # The ginkgo CLI runs e2e.test in parallel processes.
  build_into "$BIN/ginkgo" "$TOOLS_DIR" -- github.com/onsi/ginkgo/v2/ginkgo ||
    die "ginkgo must build; see the output above"
  if [ -x "$BIN/e2e.test" ]; then
    SUMMARY+=("$(printf '%-24s cached   %s' e2e.test "$BIN/e2e.test")")
  else
    log "e2e.test: building ..."
    t0=$(date +%s.%N)
    (cd "$TOOLS_DIR" && go test -c -trimpath -ldflags "$K8S_LDFLAGS" -o "$BIN/e2e.test.tmp.$$" k8s.io/kubernetes/test/e2e) \
      >"$WORK/e2e.test.log" 2>&1 || { tail -n 30 "$WORK/e2e.test.log" >&2; rm -f "$BIN/e2e.test.tmp.$$"; die "e2e.test must build"; }
    mv -f "$BIN/e2e.test.tmp.$$" "$BIN/e2e.test"
    SUMMARY+=("$(printf '%-24s built    in %6ss' e2e.test "$(elapsed "$t0")")")
  fi
fi

# The harness's own helpers from the tools module: the plugin registrar that
# stands in for node-driver-registrar, and the pod sandbox (pause) binary.
# They are small and ours, so they are rebuilt every time (the Go build cache
# makes that a second).
for cmd in spool-registrar spool-livenessprobe pause; do
  rm -f "$BIN/$cmd"
  CGO_ENABLED=0 build_into "$BIN/$cmd" "$TOOLS_DIR" -- "./cmd/$cmd" ||
    die "$cmd must build; see the output above"
done

# ---------------------------------------------------------------------------
# CSI sidecars. Their go.mod files carry replace directives, so `go install
# M@v` refuses them: copy the module out of the module cache and build there.

# newest_version MODULE MAJOR PIN CACHEPREFIX: prints the version to use.
newest_version() {
  local mod=$1 major=$2 pin=$3 prefix=$4 v
  if [ -n "$pin" ]; then echo "$pin"; return 0; fi
  if v=$(go list -m -versions "$mod" 2>"$WORK/versions.err"); then
    # Releases only (no -rc/-alpha), of this major version, newest last.
    v=$(tr ' ' '\n' <<<"$v" | grep -E "^v$major\.[0-9]+\.[0-9]+$" | sort -V | tail -n 1 || true)
    if [ -n "$v" ]; then echo "$v"; return 0; fi
    warn "$mod: the module proxy lists no v$major.x release"
  else
    warn "$mod: 'go list -m -versions' failed: $(tr '\n' ' ' <"$WORK/versions.err")"
  fi
  # Offline: fall back to the newest version already built.
  v=$(cd "$SIDECARS" && ls -d "$prefix"-v* 2>/dev/null | sed "s/^$prefix-//" | sort -V | tail -n 1 || true)
  if [ -n "$v" ]; then
    warn "$mod: using $v, the newest version already in the cache"
    echo "$v"
    return 0
  fi
  return 1
}

# module_dir MODULE@VERSION: downloads it and prints its module-cache directory.
# On failure, $WORK/download.err says why (go puts the reason in the JSON).
module_dir() {
  local json=$WORK/download.json
  if ! go mod download -json "$1" >"$json" 2>"$WORK/download.err"; then
    sed -n 's/^[[:space:]]*"Error": "\(.*\)",\{0,1\}$/\1/p' "$json" >>"$WORK/download.err"
    return 1
  fi
  sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p' "$json"
}

ENV_LINES=()

# sidecar REPO MODULE MAJOR PIN CMD...: builds each CMD of MODULE into
# $SIDECARS/REPO-<version>/bin and links it from $BIN.
sidecar() {
  local repo=$1 mod=$2 major=$3 pin=$4; shift 4
  local ver dir src out cmd all_cached=1 var
  if ! ver=$(newest_version "$mod" "$major" "$pin" "$repo"); then
    warn "$mod: not served by the module proxy and not in the cache; skipping $*"
    SKIPPED+=("$* ($mod not served)")
    for cmd in "$@"; do SUMMARY+=("$(printf '%-24s SKIPPED  (module not served)' "$cmd")"); done
    return 0
  fi
  log "$mod: $ver"
  dir=$SIDECARS/$repo-$ver
  for cmd in "$@"; do [ -x "$dir/bin/$cmd" ] || all_cached=0; done

  if [ $all_cached -eq 0 ]; then
    local moddir
    moddir=$(module_dir "$mod@$ver") || true
    if [ -z "$moddir" ] || [ ! -d "$moddir" ]; then
      warn "$mod@$ver: cannot download: $(tr '\n' ' ' <"$WORK/download.err")"
      SKIPPED+=("$* ($mod@$ver not downloadable)")
      for cmd in "$@"; do SUMMARY+=("$(printf '%-24s SKIPPED  (%s@%s not downloadable)' "$cmd" "$mod" "$ver")"); done
      return 0
    fi
    src=$WORK/$repo-$ver
    cp -r "$moddir" "$src"
    chmod -R u+w "$src"
    if [ "$repo" = external-snapshotter ]; then
      # Its go.mod says `replace .../client/v8 => ./client`, but client/ is a
      # module of its own and not part of the module zip: put it there.
      local cmoddir
      cmoddir=$(module_dir "github.com/kubernetes-csi/external-snapshotter/client/v$major@$ver") || true
      if [ -z "$cmoddir" ] || [ ! -d "$cmoddir" ]; then
        warn "external-snapshotter client/v$major@$ver: cannot download: $(tr '\n' ' ' <"$WORK/download.err")"
        FAILED+=("$*")
        return 0
      fi
      rm -rf "$src/client"
      cp -r "$cmoddir" "$src/client"
      chmod -R u+w "$src/client"
    fi
  fi

  var=$(tr 'a-z-' 'A-Z_' <<<"$repo")_VERSION
  ENV_LINES+=("$var=$ver")

  if [ "$repo" = external-snapshotter ]; then
    if [ ! -d "$dir/crds" ]; then
      local cmoddir
      cmoddir=${src:+$src/client}
      [ -n "$cmoddir" ] || cmoddir=$(module_dir "github.com/kubernetes-csi/external-snapshotter/client/v$major@$ver") || true
      if [ -n "$cmoddir" ] && [ -d "$cmoddir/config/crd" ]; then
        mkdir -p "$dir/crds.tmp.$$"
        # The CRDs only (not kustomization.yaml), so `kubectl apply -f crds/` works.
        cp "$cmoddir"/config/crd/*.storage.k8s.io_*.yaml "$dir/crds.tmp.$$/"
        chmod u+w "$dir/crds.tmp.$$"/*
        mv "$dir/crds.tmp.$$" "$dir/crds"
        log "snapshot CRDs copied to $dir/crds"
      else
        warn "external-snapshotter client $ver: no config/crd directory; CRDs not copied"
      fi
    fi
    [ -d "$dir/crds" ] && ln -sfn "../sidecars/$repo-$ver/crds" "$K8S_DIR/crds"
  fi

  for cmd in "$@"; do
    out=$dir/bin/$cmd
    if build_into "$out" "${src:-$WORK}" -- -ldflags "-X main.version=$ver" "./cmd/$cmd"; then
      ln -sfn "../../sidecars/$repo-$ver/bin/$cmd" "$BIN/$cmd"
    else
      FAILED+=("$cmd $ver")
    fi
  done
}

# Outside any module, so that `go list -m`/`go mod download` ask the proxy
# about the sidecar modules alone.
cd "$WORK"
sidecar external-provisioner github.com/kubernetes-csi/external-provisioner/v6 6 "${CSI_PROVISIONER_VERSION:-}" csi-provisioner
sidecar external-attacher github.com/kubernetes-csi/external-attacher/v4 4 "${CSI_ATTACHER_VERSION:-}" csi-attacher
sidecar external-resizer github.com/kubernetes-csi/external-resizer/v2 2 "${CSI_RESIZER_VERSION:-}" csi-resizer
sidecar external-snapshotter github.com/kubernetes-csi/external-snapshotter/v8 8 "${CSI_SNAPSHOTTER_VERSION:-}" csi-snapshotter snapshot-controller

# ---------------------------------------------------------------------------
{
  echo "# Written by hack/e2e-tools.sh; source it to find the e2e binaries."
  echo "K8S_VERSION=$K8S_VERSION"
  echo "ETCD_VERSION=$ETCD_VERSION"
  for l in "${ENV_LINES[@]}"; do echo "$l"; done
  echo "E2E_BIN=$BIN"
  [ -e "$K8S_DIR/crds" ] && echo "E2E_CRDS=$K8S_DIR/crds"
} >"$K8S_DIR/versions.env.tmp.$$"
mv -f "$K8S_DIR/versions.env.tmp.$$" "$K8S_DIR/versions.env"

log "summary:"
for l in "${SUMMARY[@]}"; do log "  $l"; done
log "total $(elapsed "$T_START")s; binaries in $BIN; versions in $K8S_DIR/versions.env"
if [ ${#SKIPPED[@]} -gt 0 ]; then warn "skipped: ${SKIPPED[*]}"; fi
if [ ${#FAILED[@]} -gt 0 ]; then die "sidecar builds failed: ${FAILED[*]}"; fi
exit 0
