#!/usr/bin/env bash
# make chart: lints charts/spool with helm (every flavour, --strict) and
# runs test/chart, which renders every flavour with helm template and with
# kubectl kustomize and compares the objects field by field, checks values
# and bad values, and that the chart's README names every value.
#
# helm and kubectl come from the e2e cache (hack/e2e-tools.sh builds them
# from Go modules: seconds when cached, about ten minutes on an empty Go
# build cache, most of it Kubernetes for kubectl).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
GO=${GO:-go}

t0=$(date +%s)
log=$REPO/_output/chart-tools.log
mkdir -p "$REPO/_output"
echo "chart: helm and kubectl from hack/e2e-tools.sh (log: $log)"
hack/e2e-tools.sh >"$log" 2>&1 || { tail -n 30 "$log" >&2; echo "chart: hack/e2e-tools.sh failed" >&2; exit 1; }
K8S_VERSION=$(cd test/e2e/tools && $GO list -m -f '{{if .Replace}}{{.Replace.Version}}{{else}}{{.Version}}{{end}}' k8s.io/kubernetes)
# shellcheck source=/dev/null
source "${SPOOL_E2E_CACHE:-$REPO/.cache/e2e}/k8s-$K8S_VERSION/versions.env"
HELM=$E2E_BIN/helm KUBECTL=$E2E_BIN/kubectl
"$HELM" version --short

for flavour in single-node local shared; do
  "$HELM" lint --strict charts/spool --namespace spool-system --set flavour="$flavour" | sed "s/^/[$flavour] /"
done
"$HELM" lint --strict charts/spool --namespace spool-system --set flavour=shared,snapshotMetadata.enabled=true,metrics.serviceMonitor.enabled=true |
  sed 's/^/[shared, every option] /'

HELM=$HELM KUBECTL=$KUBECTL $GO test -tags chart -count=1 -v ./test/chart 2>&1 |
  grep -vE '^=== (RUN|PAUSE|CONT)'
rc=${PIPESTATUS[0]}
echo "chart: finished in $(( $(date +%s) - t0 ))s (exit $rc)"
exit "$rc"
