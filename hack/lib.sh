# Shared by the hack/ scripts: start bin/spool on a pool under a temp dir and
# tear everything down again, checking that nothing leaked.

# spool_start DIR [extra spool flags...]: starts bin/spool with its socket,
# pool and log under DIR and waits for the socket. Sets SPOOL_PID.
spool_start() {
  local dir=$1; shift
  mkdir -p "$dir/pool"
  bin/spool --endpoint "unix://$dir/csi.sock" --node-id "${SPOOL_NODE_ID:-spool-node}" \
    --pool "default=$dir/pool" "$@" >"$dir/spool.log" 2>&1 &
  SPOOL_PID=$!
  for _ in $(seq 100); do
    # The socket file appears a moment before the driver listens on it:
    # wait for the log line that says it serves.
    [ -S "$dir/csi.sock" ] && grep -q '"Serving CSI"' "$dir/spool.log" && return 0
    kill -0 "$SPOOL_PID" 2>/dev/null || { cat "$dir/spool.log"; echo "spool exited during start" >&2; return 1; }
    sleep 0.1
  done
  echo "spool did not create its socket within 10s" >&2
  return 1
}

# spool_stop: stops the driver started by spool_start.
spool_stop() {
  if [ -n "${SPOOL_PID:-}" ] && kill -0 "$SPOOL_PID" 2>/dev/null; then
    kill -TERM "$SPOOL_PID"
    wait "$SPOOL_PID" 2>/dev/null || true
  fi
  SPOOL_PID=
}

# check_leaks DIR: fails when a loop device or mount under DIR remains.
check_leaks() {
  local dir=$1 bad=0
  if losetup -a | grep -F "$dir/"; then
    echo "LEAK: loop devices backed by files under $dir" >&2; bad=1
  fi
  if awk -v d="$dir/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | grep .; then
    echo "LEAK: mounts under $dir" >&2; bad=1
  fi
  return $bad
}
