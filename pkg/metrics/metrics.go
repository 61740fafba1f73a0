// Package metrics exposes Spool's Prometheus metrics: CSI calls by method
// and code, pool capacity, volume and snapshot counts, attached loop
// devices, and what the startup reconciliation repaired or failed to.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"k8s.io/klog/v2"

	"github.com/spool-csi/spool/pkg/pool"
)

const namespace = "spool"

// Reconciliation actions counted by Reconciled.
const (
	ActionDetachLoop      = "detach_orphan_loop"
	ActionDeleteEphemeral = "delete_orphan_ephemeral"
	ActionThaw            = "thaw_frozen_filesystem"
)

// Metrics holds the driver's metrics. A nil *Metrics records nothing, so
// callers need not check whether metrics are enabled.
type Metrics struct {
	reg       *prometheus.Registry
	requests  *prometheus.CounterVec
	duration  *prometheus.HistogramVec
	reconcile *prometheus.CounterVec
	pools     *poolCollector
}

// New registers the metrics. pools are reported at every scrape; attached,
// when not nil, counts the loop devices backed by pool images.
func New(pools []*pool.Pool, attached func() (int, error)) *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "csi_requests_total",
			Help: "CSI calls by method and gRPC code.",
		}, []string{"method", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "csi_request_duration_seconds",
			Help:    "Duration of CSI calls by method and gRPC code.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60},
		}, []string{"method", "code"}),
		reconcile: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "reconcile_total",
			Help: "Repairs made by the startup reconciliation, by action and result (ok or error).",
		}, []string{"action", "result"}),
		pools: &poolCollector{pools: pools, attached: attached, every: collectEvery},
	}
	m.reg.MustRegister(m.requests, m.duration, m.reconcile,
		m.pools,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// ObserveRequest records one CSI call.
func (m *Metrics) ObserveRequest(method, code string, d time.Duration) {
	if m == nil {
		return
	}
	m.requests.WithLabelValues(method, code).Inc()
	m.duration.WithLabelValues(method, code).Observe(d.Seconds())
}

// Reconciled records one repair of the startup reconciliation.
func (m *Metrics) Reconciled(action string, err error) {
	if m == nil {
		return
	}
	result := "ok"
	if err != nil {
		result = "error"
	}
	m.reconcile.WithLabelValues(action, result).Inc()
}

// Serve serves /metrics on lis until ctx is cancelled.
func (m *Metrics) Serve(ctx context.Context, lis net.Listener) error {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg, MaxRequestsInFlight: maxScrapes}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(lis) }()
	klog.InfoS("Serving metrics", "address", lis.Addr().String())
	select {
	case <-ctx.Done():
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return srv.Shutdown(shutdownCtx)
	case err := <-errc:
		if errors.Is(err, http.ErrServerClosed) {
			return nil
		}
		return fmt.Errorf("serving metrics on %s: %w", lis.Addr(), err)
	}
}

var (
	labels       = []string{"pool"}
	capacityDesc = prometheus.NewDesc(namespace+"_pool_capacity_bytes",
		"Bytes the pool may provision (configured capacity or filesystem size).", labels, nil)
	provisionedDesc = prometheus.NewDesc(namespace+"_pool_provisioned_bytes",
		"Sum of the sizes of the pool's volumes.", labels, nil)
	allocatedDesc = prometheus.NewDesc(namespace+"_pool_allocated_bytes",
		"Bytes the pool's volume images (and copied snapshot images) occupy on disk.", labels, nil)
	invalidDesc = prometheus.NewDesc(namespace+"_pool_invalid_objects",
		"Objects in the pool skipped because their metadata is not what Spool writes (see the log).", labels, nil)
	snapshotBytesDesc = prometheus.NewDesc(namespace+"_pool_snapshot_bytes",
		"Bytes the pool's snapshots count against its capacity.", labels, nil)
	availableDesc = prometheus.NewDesc(namespace+"_pool_available_bytes",
		"Bytes a new volume may still provision.", labels, nil)
	unbackedDesc = prometheus.NewDesc(namespace+"_pool_unbacked_bytes",
		"Provisioned bytes the pool's filesystem could no longer hold if every volume were filled.", labels, nil)
	volumesDesc = prometheus.NewDesc(namespace+"_volumes",
		"Volumes in the pool.", labels, nil)
	snapshotsDesc = prometheus.NewDesc(namespace+"_snapshots",
		"Snapshots in the pool.", labels, nil)
	poolErrorsDesc = prometheus.NewDesc(namespace+"_pool_scrape_errors",
		"1 when the pool's capacity could not be read at this scrape.", labels, nil)
	loopsDesc = prometheus.NewDesc(namespace+"_attached_loop_devices",
		"Loop devices on this node backed by pool images.", nil, nil)
)

// collectEvery is the least time between two reads of the pools: a scrape
// within it gets the figures of the last read. Reading a pool walks its
// volumes (on a shared pool, over the share) and counting loop devices
// opens every image, so scrapes must not be able to make the driver do
// that without bound.
const collectEvery = time.Second

// maxScrapes bounds the /metrics requests served at once.
const maxScrapes = 2

// poolCollector reads the pools at scrape time, at most once per
// collectEvery; concurrent scrapes wait for one read.
type poolCollector struct {
	pools    []*pool.Pool
	attached func() (int, error)

	every time.Duration // collectEvery; tests set their own
	mu    sync.Mutex
	last  time.Time
	kept  []prometheus.Metric
}

func (c *poolCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{capacityDesc, provisionedDesc, allocatedDesc, snapshotBytesDesc, invalidDesc, availableDesc, unbackedDesc, volumesDesc, snapshotsDesc, poolErrorsDesc, loopsDesc} {
		ch <- d
	}
}

func (c *poolCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if time.Since(c.last) >= c.every {
		c.kept = c.read()
		c.last = time.Now()
	}
	for _, m := range c.kept {
		ch <- m
	}
}

// read reads the pools and loop devices once.
func (c *poolCollector) read() []prometheus.Metric {
	var out []prometheus.Metric
	gauge := func(d *prometheus.Desc, v float64, lv ...string) {
		out = append(out, prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, lv...))
	}
	for _, p := range c.pools {
		name := p.Name()
		gauge(volumesDesc, float64(len(p.List())), name)
		gauge(snapshotsDesc, float64(len(p.ListSnapshots())), name)
		gauge(invalidDesc, float64(len(p.Invalid())), name)
		capa, err := p.Capacity()
		if err != nil {
			klog.ErrorS(err, "Could not read pool capacity for metrics", "pool", name)
			gauge(poolErrorsDesc, 1, name)
			continue
		}
		gauge(poolErrorsDesc, 0, name)
		gauge(capacityDesc, float64(capa.Total), name)
		gauge(provisionedDesc, float64(capa.Provisioned), name)
		gauge(allocatedDesc, float64(capa.Allocated), name)
		gauge(snapshotBytesDesc, float64(capa.Snapshots), name)
		gauge(availableDesc, float64(capa.Available), name)
		gauge(unbackedDesc, float64(capa.Unbacked), name)
	}
	if c.attached != nil {
		if n, err := c.attached(); err == nil {
			gauge(loopsDesc, float64(n))
		} else {
			klog.ErrorS(err, "Could not count loop devices for metrics")
		}
	}
	return out
}
