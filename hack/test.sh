#!/usr/bin/env bash
# make test: every test of the module, printed as plain `go test ./...`
# prints it (hack/testreport), then one line listing every skipped test and
# why: a case skipped for a missing tool or privilege shows without -v.
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
hack/need.sh test
"$GO" build -o _output/testreport ./hack/testreport
rc=0
"$GO" test -count=1 -json "$@" ./... | _output/testreport || rc=$?
exit "$rc"
