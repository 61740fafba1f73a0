#!/usr/bin/env bash
# deploy/snapshot-metadata/setup.sh: what changed block tracking needs in a
# cluster before this component is applied (deploy/README.md, "Changed
# block tracking"), once per cluster:
#
#   1. a CA and a serving certificate for the sidecar's Service,
#      csi-snapshot-metadata.<namespace> (openssl; files in a temporary
#      directory that is removed: nothing to commit, the CA key is gone);
#   2. the Secret csi-snapshot-metadata-certs (kubernetes.io/tls) holding
#      the certificate and key, in the namespace;
#   3. the SnapshotMetadataService object named after the driver, with the
#      Service's address, the CA and the audience backup clients' tokens
#      must carry.
#
# The SnapshotMetadataService CRD must be installed first. Run it again to
# replace the certificate (the sidecar reloads it; clients read the new CA
# from the object).
#
# Usage: setup.sh [-n NAMESPACE] [-d DRIVER] [-a AUDIENCE] [-t DAYS]
# Environment: KUBECTL (default kubectl) is the kubectl command line to use.
set -euo pipefail
ns=spool-system driver=spool.csi.dev audience=spool-snapshot-metadata days=365
while getopts n:d:a:t: opt; do
  case $opt in
    n) ns=$OPTARG ;; d) driver=$OPTARG ;; a) audience=$OPTARG ;; t) days=$OPTARG ;;
    *) echo "usage: $0 [-n NAMESPACE] [-d DRIVER] [-a AUDIENCE] [-t DAYS]" >&2; exit 2 ;;
  esac
done
read -r -a kubectl <<<"${KUBECTL:-kubectl}"
command -v openssl >/dev/null || { echo "setup.sh: openssl is missing (apt-get install openssl)" >&2; exit 1; }
"${kubectl[@]}" get crd snapshotmetadataservices.cbt.storage.k8s.io >/dev/null ||
  { echo "setup.sh: install the SnapshotMetadataService CRD first (deploy/README.md)" >&2; exit 1; }

svc=csi-snapshot-metadata
host=$svc.$ns
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
printf 'subjectAltName=DNS:%s,DNS:%s.svc,DNS:%s.svc.cluster.local\n' "$host" "$host" "$host" >san.cnf
openssl req -x509 -newkey rsa:3072 -days "$days" -nodes -keyout ca-key.pem -out ca-cert.pem -subj "/CN=$host CA" 2>/dev/null
openssl req -newkey rsa:3072 -nodes -keyout server-key.pem -out server-req.pem -subj "/CN=$host" 2>/dev/null
openssl x509 -req -in server-req.pem -days "$days" -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
  -out server-cert.pem -extfile san.cnf 2>/dev/null
openssl verify -CAfile ca-cert.pem -verify_hostname "$host" server-cert.pem >/dev/null

"${kubectl[@]}" create namespace "$ns" --dry-run=client -o yaml | "${kubectl[@]}" apply -f - >/dev/null
"${kubectl[@]}" -n "$ns" create secret tls csi-snapshot-metadata-certs --cert=server-cert.pem --key=server-key.pem \
  --dry-run=client -o yaml | "${kubectl[@]}" apply -f -
"${kubectl[@]}" apply -f - <<EOF
apiVersion: cbt.storage.k8s.io/v1beta1
kind: SnapshotMetadataService
metadata:
  name: $driver
spec:
  address: $host:6443
  audience: $audience
  caCert: $(base64 -w0 ca-cert.pem)
EOF
echo "setup.sh: certificate for $host valid $days days; SnapshotMetadataService $driver (audience $audience)"
