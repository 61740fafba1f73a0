#!/usr/bin/env bash
# make bench: measures bin/spool (built by `make build`) with test/bench and
# writes the report to docs/performance.md (or $BENCH_OUT), then prints it.
# Extra arguments go to the bench (`hack/bench.sh -help` lists them).
# Needs root: the bench attaches loop devices, mounts filesystems and drops
# the page cache. It uses fio when installed, else its own O_DIRECT I/O.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${BENCH_OUT:-docs/performance.md}

if [ "$(id -u)" != 0 ]; then
  echo "bench: must run as root: it attaches loop devices, mounts filesystems and drops the page cache (try: sudo make bench)" >&2
  exit 1
fi
if [ ! -x bin/spool ]; then
  echo "bench: bin/spool is missing: run make build (make bench does)" >&2
  exit 1
fi

tmp=$(mktemp -d /tmp/spool-bench-tool.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
go build -o "$tmp/bench" ./test/bench

# The bench stops the driver and cleans up by itself on failure or Ctrl-C;
# a failed run leaves the page as it was.
rc=0
"$tmp/bench" --spool bin/spool "$@" >"$tmp/report.md" || rc=$?
if [ "$rc" != 0 ]; then
  cat "$tmp/report.md"
  echo "bench: failed (exit $rc); $out left unchanged" >&2
  exit "$rc"
fi

cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
mem=$(awk '/^MemTotal:/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)
{
  echo "# Performance"
  echo
  echo "Measured by \`make bench\` (hack/bench.sh) on $(date -u '+%Y-%m-%d %H:%M UTC') at commit"
  echo "$(git describe --always --dirty 2>/dev/null || echo unknown), on $(nproc) CPUs (${cpu:-unknown}), $mem of memory,"
  echo "Linux $(uname -r). Run \`make bench\` (as root) to measure again; figures"
  echo "from another machine, or from a busy one (see the load average), are not comparable."
  echo
  cat "$tmp/report.md"
} >"$tmp/page.md"
cp "$tmp/page.md" "$out"
cat "$out"
