package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spool-csi/spool/driver"
	"github.com/spool-csi/spool/pkg/pool"
	"github.com/spool-csi/spool/test/csiclient"
)

// benchKey is the master key of the encrypted volumes of figure 6.
var benchKey = map[string]string{driver.SecretEncryptionKey: "spool-bench-master-key-0123456789abcdef"}

var encryptedParams = map[string]string{driver.ParamEncryption: pool.EncryptionFscrypt}

// figureEncryption is figure 6: what encryption at rest (fscrypt) costs.
// The first stage and the restage of an encrypted 64 MiB ext4 volume,
// paired with a plain one in every round; then dd through an encrypted and
// a plain volume of the same size, the page cache dropped before each run,
// alternating which goes first.
func (b *bench) figureEncryption(ctx context.Context) error {
	dir := filepath.Join(b.work, "encryption")
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return err
	}
	var first, restage [2][]float64 // [0] encrypted, [1] plain
	for i := range b.cfg.stageIters {
		for k, params := range []map[string]string{encryptedParams, nil} {
			f, r, err := b.stageTwice(ctx, dir, fmt.Sprintf("enc-stage-%d-%02d", k, i), params)
			if err != nil {
				return err
			}
			first[k], restage[k] = append(first[k], f), append(restage[k], r)
		}
	}
	b.add(
		summary("NodeStageVolume, first stage of a blank 64 MiB ext4 volume, encrypted (attach, mkfs -O encrypt, mount, add key, set policy)", first[0], latency, nil),
		summary("the same, not encrypted (paired rounds)", first[1], latency, nil),
		summary("NodeStageVolume, restage of an encrypted ext4 volume (attach, mount, add key, check policy)", restage[0], latency, nil),
		summary("the same, not encrypted (paired rounds)", restage[1], latency, nil),
	)
	return b.encryptedDataPath(ctx, dir)
}

// stageTwice creates a volume, times its first stage, unstages it and
// times a restage.
func (b *bench) stageTwice(ctx context.Context, dir, name string, params map[string]string) (first, again float64, err error) {
	v, err := b.c.Create(ctx, name, ext4StageBytes, csiclient.MountCap("ext4"), params, nodeID, dir)
	if v != nil {
		defer func() { err = errors.Join(err, discard(b.c, v)) }()
	}
	if err != nil {
		return 0, 0, err
	}
	v.Secrets = benchKey
	if first, err = timed(func() error { _, err := b.c.NodeStageVolume(ctx, stageRequest(v)); return err }); err != nil {
		return 0, 0, fmt.Errorf("%s: first stage: %w", name, err)
	}
	if _, err := b.c.NodeUnstageVolume(ctx, unstageRequest(v)); err != nil {
		return 0, 0, fmt.Errorf("%s: unstage: %w", name, err)
	}
	if again, err = timed(func() error { _, err := b.c.NodeStageVolume(ctx, stageRequest(v)); return err }); err != nil {
		return 0, 0, fmt.Errorf("%s: restage: %w", name, err)
	}
	return first, again, nil
}

// encryptedDataPath measures dd writes (conv=fsync) and reads of a file in
// an encrypted and in a plain volume. fscrypt without inline-encryption
// hardware serves O_DIRECT through the page cache, so both sides use
// buffered I/O with an fsync (writes) or a dropped cache (reads): the pair
// compares like with like.
func (b *bench) encryptedDataPath(ctx context.Context, dir string) (err error) {
	if _, err := exec.LookPath("dd"); err != nil {
		return fmt.Errorf("dd: %w", err)
	}
	size := int64(b.cfg.dataMiB) << 20
	var files [2]string
	for k, params := range []map[string]string{encryptedParams, nil} {
		// cerr, not err: the deferred discard reports into the named result.
		v, cerr := b.c.Create(ctx, fmt.Sprintf("enc-data-%d", k), 2*size, csiclient.MountCap("ext4"), params, nodeID, dir)
		if v != nil {
			defer func() { err = errors.Join(err, discard(b.c, v)) }()
		}
		if cerr != nil {
			return cerr
		}
		v.Secrets = benchKey
		if err := b.c.StageAndPublish(ctx, v); err != nil {
			return err
		}
		files[k] = filepath.Join(v.Target, "bench.dat")
	}
	mib := strconv.Itoa(b.cfg.dataMiB)
	dd := func(ctx context.Context, args ...string) (float64, error) {
		start := time.Now()
		if out, err := exec.CommandContext(ctx, "dd", append(args, "bs=1M", "count="+mib, "status=none")...).CombinedOutput(); err != nil {
			return 0, fmt.Errorf("dd %v: %w: %s", args, err, out)
		}
		return float64(size>>20) / time.Since(start).Seconds(), nil
	}
	// Lay the files out first: the measured writes overwrite.
	for _, f := range files {
		if _, err := dd(ctx, "if=/dev/zero", "of="+f, "conv=fsync"); err != nil {
			return err
		}
	}
	phases := []*dataPhase{
		{figure: fmt.Sprintf("dd write, bs=1M conv=fsync, %d MiB", size>>20), kind: mibRate,
			run: func(ctx context.Context, f string) (float64, error) {
				return dd(ctx, "if=/dev/zero", "of="+f, "conv=fsync,notrunc")
			}},
		{figure: fmt.Sprintf("dd read, bs=1M, page cache dropped, %d MiB", size>>20), kind: mibRate,
			run: func(ctx context.Context, f string) (float64, error) { return dd(ctx, "if="+f, "of=/dev/null") }},
	}
	for round := range b.cfg.dataRounds {
		for _, p := range phases {
			if err := measurePair(ctx, p, files, round); err != nil {
				return err
			}
		}
	}
	aes := kernelCipher("xts(aes)")
	for _, p := range phases {
		b.add(
			summary(p.figure+", encrypted ext4 volume", p.samples[0], p.kind, nil),
			summary(p.figure+", plain ext4 volume", p.samples[1], p.kind, nil),
			summary(p.figure+", encrypted / plain volume (paired per round)", p.ratios, ratioHi, nil),
			summary(fmt.Sprintf("%s, CPU busy (of %d) during the encrypted runs; the kernel's AES-XTS is %s", p.figure, nproc(), aes), scale(p.busy[0], 100), percent, nil),
			summary(p.figure+", CPU busy during the plain runs", scale(p.busy[1], 100), percent, nil),
		)
	}
	return nil
}

func scale(xs []float64, f float64) []float64 {
	out := make([]float64, len(xs))
	for i, x := range xs {
		out[i] = x * f
	}
	return out
}

// kernelCipher names the implementation the kernel's crypto API uses for
// an algorithm (the highest priority entry of /proc/crypto), e.g.
// xts-aes-aesni with AES-NI or xts(ecb(aes-fixed-time)) in plain C.
func kernelCipher(name string) string {
	data, err := os.ReadFile("/proc/crypto")
	if err != nil {
		return "unknown (" + err.Error() + ")"
	}
	best, bestPrio := "not listed in /proc/crypto", -1
	for _, block := range strings.Split(string(data), "\n\n") {
		fields := map[string]string{}
		for _, l := range strings.Split(block, "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok {
				fields[strings.TrimSpace(k)] = strings.TrimSpace(v)
			}
		}
		if fields["name"] != name {
			continue
		}
		if prio, err := strconv.Atoi(fields["priority"]); err == nil && prio > bestPrio {
			best, bestPrio = fields["driver"], prio
		}
	}
	return best
}
