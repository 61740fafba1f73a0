//go:build e2e

package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// Scenario 9: the driver is killed (SIGKILL) and started again while a pod
// writes to its volume. The pod keeps writing to the same data, the
// sidecars come back, and new provisioning works after the restart.
func TestDriverRestart(t *testing.T) {
	if env.spool == nil {
		t.Skip("needs Spool as a host process (make e2e), not deploy/" + *flavour)
	}
	ns := namespace(t)
	apply(t, pvc(ns, pvcSpec{name: "data", class: "spool-ext4", size: "64Mi"}))
	apply(t, pod(ns, "busy", "data",
		writeScript("/data/file", 4)+"; i=0; while true; do i=$((i+1)); echo $i >> /data/counter; sync; echo tick=$i; sleep 0.2; done", false, false))
	waitJSONPath(t, ns, "pod/busy", ".status.phase", "Running")
	var sum string
	eventually(t, "the writer's checksum", time.Minute, func() error {
		for _, l := range strings.Split(kubectl(t, "logs", "busy", "-n", ns), "\n") {
			if len(l) == 64 {
				sum = l
				return nil
			}
		}
		return fmt.Errorf("no checksum yet")
	})

	restarts := env.spool.SidecarRestarts()
	if err := env.spool.KillDriver(); err != nil {
		t.Fatal(err)
	}
	ticks := ticksOf(t, ns)
	time.Sleep(2 * time.Second)
	if err := env.spool.StartDriver(ctxFor(t)); err != nil {
		t.Fatal(err)
	}
	t.Logf("driver killed and restarted; sidecar restarts so far %d", env.spool.SidecarRestarts()-restarts)
	eventually(t, "the pod keeps writing", time.Minute, func() error {
		if now := ticksOf(t, ns); now < ticks+20 {
			return fmt.Errorf("%d ticks, %d at the kill", now, ticks)
		}
		return nil
	})
	if got := kubectl(t, "get", "pod", "busy", "-n", ns, "-o", "jsonpath={.status.phase}/{.status.containerStatuses[0].restartCount}"); got != "Running/0" {
		t.Errorf("pod state after the driver restart: %s", got)
	}

	// New provisioning, attach and mount through the restarted driver.
	apply(t, pvc(ns, pvcSpec{name: "after", class: "spool-ext4", size: "64Mi"}))
	after := checksum(t, runPod(t, ns, "after-writer", "after", writeScript("/data/file", 2), false, false))
	if got := checksum(t, runPod(t, ns, "after-reader", "after", readScript("/data/file"), false, false)); got != after {
		t.Errorf("volume made after the restart: read %s, wrote %s", got, after)
	}

	kubectl(t, "delete", "pod", "busy", "-n", ns, "--wait")
	out := runPod(t, ns, "reader", "data", readScript("/data/file")+"; wc -l < /data/counter", false, false)
	if got := checksum(t, out); got != sum {
		t.Errorf("data written before the restart: read %s, wrote %s", got, sum)
	}
}

func ticksOf(t *testing.T, ns string) int {
	t.Helper()
	n := 0
	for _, l := range strings.Split(kubectl(t, "logs", "busy", "-n", ns), "\n") {
		if v, ok := strings.CutPrefix(l, "tick="); ok {
			fmt.Sscan(v, &n)
		}
	}
	return n
}
