#!/usr/bin/env bash
# make e2e: builds (or reuses) the cluster binaries and the sidecars, then runs
# the end-to-end scenarios in test/e2e against a single-node Kubernetes that
# the test starts on this machine and tears down again. Needs root.
#
# With --deploy (make e2e-deploy) Spool runs in the cluster from deploy/
# instead: each flavour (single-node, local, then shared) is applied unchanged, with
# images made here under the names the manifests use, and scenarios 1, 3, 4,
# 5, 8 and 12 run through the in-cluster driver.
#
# With --external (make e2e-external) it runs the Kubernetes external storage
# e2e suite (e2e.test, in 8 parallel ginkgo processes) against each flavour
# (single-node, local, then shared),
# applied in the cluster as with --deploy, with
# test/e2e/external/test-driver-<flavour>.yaml, and prints "N passed,
# M failed, K skipped" per flavour.
#
# With --flavours (make e2e-flavours, what .ci/run uses) it does both in one
# cluster per flavour: the flavour is applied once, the deploy scenarios run
# beside the external suite, and the nothing-left and node-clean checks run
# when both are done, before the flavour is deleted.
#
# Independent scenarios run concurrently (go test -parallel, E2E_PARALLEL,
# default 8); the ones that count pool bytes or restart the driver run
# alone, first (test/e2e/README.md).
#
# Extra arguments go to the test binary, e.g.
#   hack/e2e.sh -test.run TestAttach
# E2E_FLAVOURS="local" limits --deploy, --external and --flavours to those
# flavours. E2E_INSTALL says how each flavour is installed (default
# "single-node=adopt shared=helm"; a flavour it does not name: kustomize):
# kustomize is kubectl apply -k deploy/<flavour>; helm is helm install
# charts/spool with the values of that flavour (make chart checks that both
# give the same objects); adopt is kubectl apply -k, then the move to Helm
# of docs/operations.md (charts/spool/adopt.sh and helm install), which must
# not restart a pod. E2E_INSTALL="" applies every flavour with kustomize.
set -euo pipefail
DEPLOY=false EXTERNAL=false
case "${1:-}" in
  --deploy) DEPLOY=true; shift ;;
  --external) EXTERNAL=true; shift ;;
  --flavours) DEPLOY=true; EXTERNAL=true; shift ;;
esac
# The scenarios make e2e-deploy runs through each flavour.
DEPLOY_TESTS='TestDynamicProvisioningImmediate|TestPreProvisionedVolume|TestAttach|TestRawBlock|TestSnapshotRestoreClone|TestEncryption'
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

[ "$(id -u)" = 0 ] || { echo "e2e: run as root (kubelet, containerd, loop devices, mounts)" >&2; exit 1; }
for tool in containerd ctr runc iptables-save ip /usr/lib/cni/bridge /bin/busybox; do
  command -v "$tool" >/dev/null || [ -x "$tool" ] || {
    echo "e2e: $tool is missing: apt-get install containerd runc containernetworking-plugins iptables iproute2 busybox-static" >&2
    exit 1
  }
done

t0=$(date +%s)
if $EXTERNAL; then hack/e2e-tools.sh --external; else hack/e2e-tools.sh; fi
K8S_VERSION=$(cd test/e2e/tools && go list -m -f '{{if .Replace}}{{.Replace.Version}}{{else}}{{.Version}}{{end}}' k8s.io/kubernetes)
# shellcheck source=/dev/null
source "${SPOOL_E2E_CACHE:-$REPO/.cache/e2e}/k8s-$K8S_VERSION/versions.env"
export E2E_BIN E2E_CRDS E2E_CBT_CRDS
echo "e2e: tools ready in $(( $(date +%s) - t0 ))s"

# install_args FLAVOUR: how the deploy tier installs it.
install_args() {
  local pair how=kustomize
  for pair in ${E2E_INSTALL-single-node=adopt shared=helm}; do
    [ "${pair%%=*}" = "$1" ] && how=${pair#*=}
  done
  echo "-e2e.install $how"
}

# run_tests ARGS...: one run of the e2e binary (one cluster), output filtered.
run_tests() {
  local rc
  set +e
  go test -tags e2e -count=1 -parallel "${E2E_PARALLEL:-8}" -timeout 120m -v ./test/e2e -args -e2e.logs "$REPO/_output/e2e-logs" "$@" 2>&1 |
    grep -vE '^=== (RUN|PAUSE|CONT)'
  rc=${PIPESTATUS[0]}
  set -e
  return "$rc"
}

rc=0
if $EXTERNAL; then
  # Each flavour as shipped (deploy/<flavour>, applied unchanged in the
  # cluster, as make e2e-deploy does), with its own test-driver file; with
  # --flavours the deploy scenarios run in the same cluster.
  tests=TestExternalStorageSuite what="external storage suite"
  if $DEPLOY; then tests="$DEPLOY_TESTS|$tests" what="deploy scenarios and external storage suite"; fi
  for flavour in ${E2E_FLAVOURS:-single-node local shared}; do
    t1=$(date +%s)
    echo "e2e: $what, deploy/$flavour ($(install_args "$flavour"))"
    # shellcheck disable=SC2046 # two words on purpose
    run_tests -test.run "$tests" -e2e.flavour "$flavour" $(install_args "$flavour") \
      -e2e.external "external/test-driver-$flavour.yaml" \
      -e2e.external-report "$REPO/_output/e2e-external/$flavour" "$@" || rc=$?
    echo "e2e: $what, deploy/$flavour, finished in $(( $(date +%s) - t1 ))s"
  done
elif $DEPLOY; then
  for flavour in ${E2E_FLAVOURS:-single-node local shared}; do
    t1=$(date +%s)
    echo "e2e: deploy/$flavour ($(install_args "$flavour"))"
    # shellcheck disable=SC2046 # two words on purpose
    run_tests -e2e.flavour "$flavour" $(install_args "$flavour") -test.run "$DEPLOY_TESTS" "$@" || rc=$?
    echo "e2e: deploy/$flavour finished in $(( $(date +%s) - t1 ))s"
    [ "$rc" = 0 ] || break
  done
else
  run_tests "$@" || rc=$?
fi
echo "e2e: finished in $(( $(date +%s) - t0 ))s (exit $rc)"
exit "$rc"
