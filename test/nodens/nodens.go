// Package nodens starts a program as a "node" of its own: in a new mount
// namespace, as the shared-pool tests run several spool node plugins on one
// machine.
package nodens

import "os/exec"

// prelude runs inside the new namespace before the program: it lazily
// unmounts the copies of every loop-device mount the namespace inherited.
// Mounts in a private namespace do not follow their originals: a copy of
// another test's (or a pod's) volume mount would keep that filesystem, and
// so its loop device, busy after its owner unmounted it.
const prelude = `awk '{ for (i = 1; i <= NF; i++) if ($i == "-") { if ($(i+2) ~ /^\/dev\/loop/) print $5; break } }' /proc/self/mountinfo |
  sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
exec "$@"`

// Command returns the command that runs bin with args in a new, private
// mount namespace (unshare --mount): the program's PID is the process's.
func Command(bin string, args ...string) *exec.Cmd {
	return exec.Command("unshare", append([]string{"--mount", "--propagation", "private", "--", "sh", "-c", prelude, "sh", bin}, args...)...)
}
