#!/usr/bin/env bash
# make run: starts bin/spool on a pool under a temp dir, walks one volume
# through its whole life against it, then keeps serving until Ctrl-C.
# make demo (--once): the same walk, then stop.
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/lib.sh
once=false
[ "${1:-}" = --once ] && once=true

work=$(mktemp -d /tmp/spool-run.XXXXXX)
cleanup() {
  spool_stop
  check_leaks "$work" || true
  [ "${KEEP:-}" = 1 ] || rm -rf "$work"
}
trap cleanup EXIT
SPOOL_NODE_ID=$(hostname | tr 'A-Z_' 'a-z-' | cut -c1-63)
export SPOOL_NODE_ID
spool_start "$work" -v "${V:-2}"
echo "spool is serving unix://$work/csi.sock with pool default=$work/pool (log: $work/spool.log)"

if [ "$(id -u)" = 0 ]; then
  go run ./test/walk --endpoint "unix://$work/csi.sock" --dir "$work"
else
  echo "not root: skipping the walk (staging needs loop devices and mounts)"
fi
$once && exit 0
echo "driver still serving at unix://$work/csi.sock; press Ctrl-C to stop (the temp pool is removed)"
wait "$SPOOL_PID"
