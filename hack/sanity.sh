#!/usr/bin/env bash
# Runs the csi-sanity binary against bin/spool, once with filesystem volumes
# and once with raw block volumes, and prints the counts of each run.
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/lib.sh
: "${CSI_SANITY:?set CSI_SANITY to the csi-sanity binary (make sanity does)}"

work=$(mktemp -d /tmp/spool-sanity.XXXXXX)
cleanup() {
  spool_stop
  check_leaks "$work" || status=1
  [ "${KEEP:-}" = 1 ] || rm -rf "$work"
}
trap cleanup EXIT
status=0

spool_start "$work" --max-volumes-per-node 16 -v 4
# ModifyVolume specs need a mutable parameter Spool really supports.
echo 'provisioning: thick' >"$work/mutable.yaml"
total_failed=0
for access in mount block; do
  echo "=== csi-sanity, $access volumes"
  set +e
  "$CSI_SANITY" --csi.endpoint "unix://$work/csi.sock" \
    --csi.mountdir "$work/target-$access" --csi.stagingdir "$work/staging-$access" \
    --csi.testvolumesize $((64 << 20)) --csi.testvolumeaccesstype "$access" \
    --csi.testnodevolumeattachlimit --ginkgo.no-color \
    --csi.testvolumemutableparameters "$work/mutable.yaml" \
    --ginkgo.junit-report "$work/junit-$access.xml" 2>&1 | tee "$work/sanity-$access.out" | grep -E '^(Ran |SUCCESS|FAIL|\s*\[FAIL\])'
  rc=${PIPESTATUS[0]}
  set -e
  line=$(grep -E '(SUCCESS|FAIL)! -- ' "$work/sanity-$access.out" | tail -1 || true)
  passed=$(sed -nE 's/.* ([0-9]+) Passed.*/\1/p' <<<"$line")
  failed=$(sed -nE 's/.* ([0-9]+) Failed.*/\1/p' <<<"$line")
  pending=$(sed -nE 's/.* ([0-9]+) Pending.*/\1/p' <<<"$line")
  skipped=$(sed -nE 's/.* ([0-9]+) Skipped.*/\1/p' <<<"$line")
  echo "csi-sanity ($access): ${passed:-?} passed, ${failed:-?} failed, ${skipped:-?} skipped, ${pending:-?} pending"
  if [ "$rc" != 0 ] || [ -z "$line" ]; then
    total_failed=1
    grep -E -A30 '\[FAIL\]' "$work/sanity-$access.out" | head -80 || true
    tail -50 "$work/spool.log"
  fi
done
[ "$total_failed" = 0 ] || status=1
exit $status
