package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

const (
	// listPage is the max_entries of the ListVolumes walk.
	listPage = 100
	// walksPerStart is how many ListVolumes walks follow each restart.
	walksPerStart = 5
	// scaleSingles is how many one-at-a-time creates and deletes are timed
	// with the pool full.
	scaleSingles = 20
)

// scaleSamples are the measurements of figure 5.
type scaleSamples struct {
	createRate, deleteRate float64
	create, del            []float64
	cold, warm             []float64 // start-up to the first ready Probe, ms
	opened, serving        []float64 // start-up to the driver's "Opened pool" and "Serving CSI" log lines, ms
	walks, pages           []float64 // ms per walk, pages per walk
	rssStart, rss          []float64 // VmRSS right after start and after the walks, bytes
}

// figureScale is figure 5: a pool of cfg.scaleVols volumes, the driver
// restarted on it (alternately with the page cache dropped and warm), then
// walked with ListVolumes.
func (b *bench) figureScale(ctx context.Context) (err error) {
	n := b.cfg.scaleVols
	ids := make([]string, n)
	defer func() {
		if err != nil {
			err = errors.Join(err, b.deleteAll(ids))
		}
	}()
	var s scaleSamples
	start := time.Now()
	err = parallel(ctx, b.cfg.callers, n, func(ctx context.Context, i int) error {
		resp, err := b.c.CreateVolume(ctx, createRequest(fmt.Sprintf("scale-%04d", i)))
		ids[i] = resp.GetVolume().GetVolumeId()
		return err
	})
	if err != nil {
		return fmt.Errorf("creating %d volumes: %w", n, err)
	}
	s.createRate = float64(n) / time.Since(start).Seconds()
	logf("created %d volumes at %.0f/s", n, s.createRate)
	if err := b.singlesWithFullPool(ctx, &s); err != nil {
		return err
	}
	for r := range b.cfg.restarts {
		if err := b.restartAndWalk(ctx, r%2 == 0, &s); err != nil {
			return err
		}
	}
	start = time.Now()
	if err := b.deleteParallel(ctx, ids); err != nil {
		return err
	}
	s.deleteRate = float64(n) / time.Since(start).Seconds()
	b.addScaleRows(s)
	return nil
}

// singlesWithFullPool times one-at-a-time creates and deletes while the
// pool holds cfg.scaleVols volumes.
func (b *bench) singlesWithFullPool(ctx context.Context, s *scaleSamples) error {
	ids := make([]string, 0, scaleSingles)
	for i := range scaleSingles {
		d, err := timed(func() error {
			resp, err := b.c.CreateVolume(ctx, createRequest(fmt.Sprintf("scale-extra-%02d", i)))
			if err == nil {
				ids = append(ids, resp.GetVolume().GetVolumeId())
			}
			return err
		})
		if err != nil {
			return errors.Join(fmt.Errorf("CreateVolume: %w", err), b.deleteAll(ids))
		}
		s.create = append(s.create, d)
	}
	for i, id := range ids {
		d, err := timed(func() error {
			_, err := b.c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id})
			return err
		})
		if err != nil {
			return errors.Join(fmt.Errorf("DeleteVolume: %w", err), b.deleteAll(ids[i:]))
		}
		s.del = append(s.del, d)
	}
	return nil
}

// restartAndWalk restarts the main driver, then walks its volumes with
// ListVolumes a few times and reads its RSS.
func (b *bench) restartAndWalk(ctx context.Context, cold bool, s *scaleSamples) error {
	ready, err := b.restartMain(ctx, cold)
	if err != nil {
		return err
	}
	if cold {
		s.cold = append(s.cold, ms(ready))
	} else {
		s.warm = append(s.warm, ms(ready))
	}
	if t, ok := b.main.logEvent("Opened pool"); ok {
		s.opened = append(s.opened, ms(t))
	}
	if t, ok := b.main.logEvent("Serving CSI"); ok {
		s.serving = append(s.serving, ms(t))
	}
	st, err := b.main.status()
	if err != nil {
		return err
	}
	s.rssStart = append(s.rssStart, float64(st.rss))
	for range walksPerStart {
		var pages, count int
		d, err := timed(func() (err error) {
			pages, count, err = b.listAll(ctx)
			return err
		})
		if err != nil {
			return err
		}
		if count != b.cfg.scaleVols {
			return fmt.Errorf("ListVolumes walk returned %d volumes, want %d", count, b.cfg.scaleVols)
		}
		s.walks, s.pages = append(s.walks, d), append(s.pages, float64(pages))
	}
	if st, err = b.main.status(); err != nil {
		return err
	}
	s.rss = append(s.rss, float64(st.rss))
	return nil
}

// listAll walks every volume with ListVolumes pages of listPage entries and
// returns the pages and entries it saw.
func (b *bench) listAll(ctx context.Context) (pages, entries int, err error) {
	token := ""
	for {
		resp, err := b.c.ListVolumes(ctx, &csi.ListVolumesRequest{MaxEntries: listPage, StartingToken: token})
		if err != nil {
			return pages, entries, fmt.Errorf("ListVolumes: %w", err)
		}
		pages++
		entries += len(resp.GetEntries())
		if token = resp.GetNextToken(); token == "" {
			return pages, entries, nil
		}
	}
}

func (b *bench) addScaleRows(s scaleSamples) {
	n := b.cfg.scaleVols
	startReason := fmt.Sprintf("the driver logged \"Opened pool\" after %s and \"Serving CSI\" after %s",
		formatMs(quantile(s.opened, 0.5)), formatMs(quantile(s.serving, 0.5)))
	cold := summary(fmt.Sprintf("driver start to first ready Probe, %d volumes, page cache dropped", n), s.cold, latency, below(1000, "< 1 s"))
	warm := summary(fmt.Sprintf("driver start to first ready Probe, %d volumes, page cache warm", n), s.warm, latency, below(1000, "< 1 s"))
	cold.reason, warm.reason = startReason, startReason
	walk := summary(fmt.Sprintf("ListVolumes walk, max_entries %d, %d volumes", listPage, n), s.walks, latency, below(100, "< 100 ms"))
	walk.reason = fmt.Sprintf("%.0f pages of %s each", quantile(s.pages, 0.5), formatMs(quantile(s.walks, 0.5)/quantile(s.pages, 0.5)))
	rss := summary(fmt.Sprintf("driver VmRSS after the walks, %d volumes", n), s.rss, memory, below(40<<20, "< 40 MiB"))
	rss.reason = fmt.Sprintf("VmRSS was %s right after start", formatMiB(quantile(s.rssStart, 0.5)))
	b.add(
		row{figure: fmt.Sprintf("create %d volumes, %d callers", n, b.cfg.callers), median: s.createRate, slow: s.createRate, kind: volRate},
		summary(fmt.Sprintf("CreateVolume, one caller, %d volumes in the pool", n), s.create, latency, nil),
		summary(fmt.Sprintf("DeleteVolume, one caller, %d volumes in the pool", n), s.del, latency, nil),
		cold, warm, walk, rss,
		summary(fmt.Sprintf("driver VmRSS right after start, %d volumes", n), s.rssStart, memory, nil),
		row{figure: fmt.Sprintf("delete %d volumes, %d callers", n, b.cfg.callers), median: s.deleteRate, slow: s.deleteRate, kind: volRate},
	)
}
