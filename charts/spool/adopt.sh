#!/usr/bin/env bash
# charts/spool/adopt.sh: hands an installation made with kubectl apply -k
# deploy/<flavour> (or your overlay of it) to a Helm release, so that
# `helm install` of this chart takes its objects over instead of refusing
# them ("exists and cannot be imported into the current release").
#
# It marks every object that `kubectl kustomize DIR` renders, except the
# Namespace, as the release's: the label app.kubernetes.io/managed-by=Helm
# and the annotations meta.helm.sh/release-name and
# meta.helm.sh/release-namespace. It changes nothing else. Then run
#   helm install RELEASE charts/spool -n NAMESPACE --set flavour=<flavour> [...] --force-conflicts
# with the values that render the same objects (docs/operations.md, "From
# kustomize to Helm"): the chart uses the flavours' names and pod
# templates, so no pod restarts. --force-conflicts hands the fields kubectl
# apply set to the release: Helm applies server-side, and the API server
# otherwise refuses a field another manager set to a value that differs
# even by a default it filled in (a fieldRef's apiVersion). The Namespace
# stays yours.
#
# Usage: adopt.sh -k DIR [-r RELEASE] [-n NAMESPACE]
# Environment: KUBECTL (default kubectl) is the kubectl command line to use.
set -euo pipefail
dir='' release=spool ns=spool-system
usage() { echo "usage: $0 -k KUSTOMIZATION_DIR [-r RELEASE] [-n NAMESPACE]" >&2; exit 2; }
while getopts k:r:n: opt; do
  case $opt in
    k) dir=$OPTARG ;; r) release=$OPTARG ;; n) ns=$OPTARG ;; *) usage ;;
  esac
done
[ -n "$dir" ] || usage
read -r -a kubectl <<<"${KUBECTL:-kubectl}"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"${kubectl[@]}" kustomize "$dir" >"$tmp/rendered.yaml"
# Every object but the Namespace: the release lives in it, and Helm must
# not delete it with the release.
awk 'BEGIN { RS = "\n---\n"; ORS = "\n---\n" } !/(^|\n)kind: Namespace(\n|$)/' "$tmp/rendered.yaml" >"$tmp/objects.yaml"
n=$(grep -c '^kind:' "$tmp/objects.yaml" || true)
[ "$n" -gt 0 ] || { echo "adopt.sh: kubectl kustomize $dir rendered no object" >&2; exit 1; }

"${kubectl[@]}" label -f "$tmp/objects.yaml" --overwrite app.kubernetes.io/managed-by=Helm >/dev/null
"${kubectl[@]}" annotate -f "$tmp/objects.yaml" --overwrite \
  meta.helm.sh/release-name="$release" meta.helm.sh/release-namespace="$ns" >/dev/null
echo "adopt.sh: $n objects of $dir marked for the Helm release $release in $ns; now: helm install $release charts/spool -n $ns --set flavour=... --force-conflicts"
