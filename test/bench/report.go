package main

import (
	"fmt"
	"strings"
)

// render prints the report: the machine, the table, the missed targets and
// how each figure is measured.
func (b *bench) render() string {
	var w strings.Builder
	f := b.facts
	fmt.Fprintf(&w, "## Machine and run\n\n")
	if b.cfg.quick {
		fmt.Fprintf(&w, "**-quick run: counts and sizes cut down to check the bench itself; not a measurement.**\n\n")
	}
	fmt.Fprintf(&w, "- CPUs (nproc): %d, %s; memory %s\n", f.nproc, f.cpuModel, f.memTotal)
	fmt.Fprintf(&w, "- kernel: Linux %s\n", f.kernel)
	fmt.Fprintf(&w, "- pool filesystem (figures 1, 2, 5, 6 and the ext4 pools of 3 and 7): %s\n", f.poolFS)
	if f.xfsPool != "" {
		fmt.Fprintf(&w, "- xfs pools (figures 3 and 7): %s\n", f.xfsPool)
	}
	for _, d := range f.dataPools {
		fmt.Fprintf(&w, "- figure 4 pool, %s\n", d)
	}
	fmt.Fprintf(&w, "- load average (1, 5, 15 min): %s before, %s after\n", f.loadBefore, f.loadAfter)
	fmt.Fprintf(&w, "- driver: bin/spool %s, a child process of the bench, `-v 0`\n", f.spool)
	if f.ioEngine != "" {
		fmt.Fprintf(&w, "- data path engine (figure 4): %s\n", f.ioEngine)
	}
	fmt.Fprintf(&w, "- bench: %s; wall time %s\n\n", f.goVersion, f.wall)

	fmt.Fprintf(&w, "## Results\n\n%s\n", renderTable(b.rows))
	w.WriteString(`"p90" is the slow side: the 90th percentile of a latency, the 10th
percentile of a rate (what 90% of the runs reached). A ratio row divides the
medians (its p90 column: the slow sides), except in figure 4, where each
round pairs a volume run with a plain run made right after it and the row
shows the median (and 10th percentile) of those per-round ratios. "met?"
judges the median.

`)
	if b.dataMatrix != "" {
		fmt.Fprintf(&w, "### Figure 4: the data path per pool filesystem\n\n%s\n", b.dataMatrix)
	}
	var missed []string
	for _, r := range b.rows {
		if r.missed() {
			reason := r.reason
			if reason == "" {
				reason = "no reason the bench can tell"
			}
			missed = append(missed, fmt.Sprintf("- **%s**: %s against a target of %s. Why: %s.", r.figure, r.kind.show(r.median), r.target.text, reason))
		}
	}
	if len(missed) > 0 {
		fmt.Fprintf(&w, "### Missed targets\n\n%s\n\n", strings.Join(missed, "\n"))
	} else {
		w.WriteString("Every figure with a target met it.\n\n")
	}
	w.WriteString(b.method())
	return w.String()
}

// method describes how each figure is measured, with this run's counts.
func (b *bench) method() string {
	c := b.cfg
	return fmt.Sprintf(`## How the figures are measured

The bench starts bin/spool as a child process (own process group; SIGTERM
if the bench dies) on a pool under a temp dir and talks CSI over its unix
socket, like a CO's sidecars would. Every latency is the time of the CSI
call as the client sees it, gRPC included (see the Probe round trip).

1. **CreateVolume and DeleteVolume**: %[1]d thin 64 MiB ext4 volumes created
   one at a time, each right after the baseline, then deleted one at a time.
   The baseline is the bench doing by hand, in a directory next to the pool
   (same filesystem), what a crash-safe create needs at least: create and
   truncate a sparse file, write the volume's JSON metadata, fsync both,
   rename the temp directory into place and fsync its parent. The 1-caller
   rate divides the sequential creates into %[2]d windows; the %[3]d-caller
   rate is %[2]d rounds of %[4]d creates made by %[3]d goroutines over one
   gRPC connection (the baseline is measured the same way).
2. **Node calls**: %[5]d iterations. Each creates a volume, attaches it
   (ControllerPublishVolume, whose publish context NodeStage checks), then
   times NodeStage (blank volume: loop attach, superblock probe, mkfs, mount(2)),
   NodePublish, NodeUnpublish, NodeUnstage and NodeStage again (formatted
   volume). The reference rows do the kernel work directly: loop attach with
   direct I/O, mkfs.ext4 -F -m0 (the driver's options), mount(2).
3. **Snapshots**: a 1 GiB block volume is staged, published and filled with
   %[6]d MiB of random data through the published device (O_DIRECT, then
   fsync); it stays published. Then %[7]d times: drop the page cache, time
   CreateSnapshot, drop the page cache, time CreateVolume from the snapshot,
   delete both. The xfs pool is a second driver on an xfs (reflink=1) made on
   a 3 GiB sparse image attached to a loop device; the ext4 pool is the main
   driver's. The copy method comes from the driver's snapshot.json and
   volume.json.
4. **Data path**: for each pool filesystem (%[17]s), a second driver
   on a pool made on that filesystem, itself on a sparse image on a loop
   device with direct I/O; in it, a thin and then a thick published ext4
   volume of %[20]d MiB (loop device with direct I/O) with a file of %[19]d
   MiB, against a file in a plain directory of the same pool filesystem.
   The first write of each file (into the holes of a thin image, the
   preallocated extents of a thick one, a new plain file) is timed once;
   every later write overwrites allocated blocks. Then %[21]d rounds; in
   each, every measurement runs on both files back to back (the volume
   first in even rounds), with the page cache dropped before each run. All
   I/O is O_DIRECT; sequential runs keep one 1 MiB request in flight;
   random runs last %[18]v each; writes end with an fsync.
5. **Scale**: %[11]d thin 64 MiB volumes created by %[3]d callers, %[12]d
   one-at-a-time creates and deletes timed with the pool full, then %[13]d
   restarts (SIGTERM, wait for exit, start; page cache dropped before every
   other start). Start-up runs from just before fork/exec to the first Probe
   answering ready; the bench dials as soon as the socket exists and polls
   every millisecond. After each start, %[14]d full ListVolumes walks with
   max_entries %[15]d, then VmRSS from /proc/PID/status.
6. **Encryption at rest**: %[5]d rounds, each creating an encrypted
   (encryption: fscrypt) and a plain 64 MiB ext4 volume and timing the first
   stage and, after an unstage, the restage of each. Then an encrypted and a
   plain volume of %[9]d MiB are published and dd (bs=1M, %[8]d MiB) writes
   (conv=fsync, overwriting) and reads a file in each, %[10]d rounds, the page
   cache dropped before every run, alternating which goes first. dd uses
   buffered I/O: fscrypt serves O_DIRECT through the page cache unless the
   block device has inline encryption, so both sides are measured alike.
   The kernel's AES implementation is named in /proc/crypto (xts(aes)).
7. **Changed block tracking**: a %[16]d GiB block volume is filled with
   random data (O_DIRECT), snapshotted, 1 %% of its 4 KiB blocks (chosen at
   random, distinct) are overwritten with random data (O_DIRECT, fsync), and
   it is snapshotted again. Then %[7]d times: drop the page cache, time
   GetMetadataDelta between the two snapshots (the whole stream, read by the
   bench over the socket); drop the page cache, time GetMetadataAllocated of
   the first. Precision is the bytes overwritten over the bytes the delta
   reports. The xfs pool is a second driver on an xfs (reflink=1) made on a
   sparse image attached to a loop device; the ext4 pool is the main
   driver's.

The driver's peak RSS is the highest VmHWM of any driver process of the run,
read just before it was stopped.
`, c.seqVolumes, c.rateRounds, c.callers, 10*c.callers, c.stageIters, c.snapDataMiB, c.snapRuns,
		c.dataMiB, 2*c.dataMiB, c.dataRounds, c.scaleVols, scaleSingles, c.restarts, walksPerStart, listPage, c.cbtGiB, c.dataPools, c.randTime, c.dpMiB, 2*c.dpMiB, c.dpRounds)
}
