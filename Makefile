# Spool: see README.md for what each target does.
SHELL := /bin/bash
GO ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo v0.0.0-dev)
LDFLAGS := -X github.com/spool-csi/spool/pkg/version.Version=$(VERSION)
CACHE ?= $(CURDIR)/.cache
# csi-sanity comes from the csi-test module Spool's go.mod already requires
# (sanity/ runs its library in-process): one version, one module graph.
CSI_TEST_MODULE := github.com/kubernetes-csi/csi-test/v5
CSI_TEST_VERSION := $(shell $(GO) list -m -f '{{.Version}}' $(CSI_TEST_MODULE) 2>/dev/null)
CSI_SANITY := $(CACHE)/tools/csi-sanity-$(CSI_TEST_VERSION)
STATICCHECK_VERSION := v0.8.2
IMAGE ?= ghcr.io/spool-csi/spool:$(VERSION)
FUZZTIME ?= 10s

.PHONY: all build test test-race test-faults test-unit sanity e2e e2e-deploy e2e-external e2e-flavours e2e-tools chart bench run demo lint fmt vet staticcheck fuzz image clean

all: build

build: ## bin/spool
	$(GO) build -trimpath -ldflags "$(LDFLAGS)" -o bin/spool ./cmd/spool

test: ## unit tests, in-process csi-sanity and the data lifecycle tests (root for the last two); ends with what it skipped
	GO=$(GO) hack/test.sh

test-race: ## unit and in-process sanity tests with the race detector
	hack/need.sh test
	$(GO) test -race -count=1 ./pkg/... ./driver/... ./sanity/...

test-faults: ## kill the driver at every fault point and 200 random moments, restart, retry, check (root)
	hack/need.sh run
	$(GO) test -tags faults -count=1 -timeout 20m -v ./test/faults 2>&1 | grep -E '^(=== RUN|--- |PASS|FAIL|ok|fault injection:|\s+faults_test.go)'; exit $${PIPESTATUS[0]}

test-unit: ## only the tests that need no root
	$(GO) test -count=1 ./pkg/... ./driver/...

$(CSI_SANITY):
	@[ -n "$(CSI_TEST_VERSION)" ] || { echo "cannot read the version of $(CSI_TEST_MODULE) from go.mod" >&2; exit 1; }
	@mkdir -p $(dir $@)
	$(GO) build -trimpath -ldflags "-X main.VERSION=$(CSI_TEST_VERSION)" -o $@.tmp $(CSI_TEST_MODULE)/cmd/csi-sanity
	mv $@.tmp $@

sanity: build $(CSI_SANITY) ## the csi-sanity binary against bin/spool
	hack/need.sh sanity
	CSI_SANITY=$(CSI_SANITY) hack/sanity.sh

e2e-tools: ## build (or reuse from .cache/e2e) the Kubernetes binaries, etcd and the CSI sidecars
	hack/e2e-tools.sh

e2e: build ## end-to-end scenarios on a single-node Kubernetes started here (root; cold build ~25 min, warm run ~7 min)
	hack/need.sh e2e
	hack/e2e.sh

e2e-deploy: build ## deploy/single-node, deploy/local and deploy/shared as pods in that cluster, scenarios 1, 3, 4, 5, 8, 12 through them (root)
	hack/need.sh e2e
	hack/e2e.sh --deploy

e2e-external: build ## the Kubernetes external storage e2e suite against Spool (root; builds e2e.test once)
	hack/need.sh e2e
	hack/e2e.sh --external

e2e-flavours: build ## e2e-deploy and e2e-external together, one cluster per flavour (root; what .ci/run runs)
	hack/need.sh e2e
	hack/e2e.sh --flavours

chart: ## helm lint charts/spool, and check it renders what deploy/ does (builds helm and kubectl into .cache/e2e if missing)
	hack/chart.sh

run: build ## start the driver on a temp pool, walk one volume through its life, keep serving
	hack/need.sh run
	hack/run.sh

demo: build ## the walk of `make run`, then stop
	hack/need.sh run
	hack/run.sh --once

bench: build ## benchmark bin/spool and write docs/performance.md (root, a few minutes)
	hack/need.sh bench
	hack/bench.sh

fmt:
	gofmt -w $$(git ls-files '*.go')

vet:
	$(GO) vet ./...
	$(GO) vet -tags e2e ./test/e2e/...
	$(GO) vet -tags faults ./test/faults/...
	$(GO) vet -tags chart ./test/chart/...

staticcheck:
	$(GO) run honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION) ./...
	$(GO) run honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION) -tags e2e ./test/e2e/...
	$(GO) run honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION) -tags chart ./test/chart/...

lint: vet staticcheck ## gofmt, vet, staticcheck
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed: $$out"; exit 1; fi

fuzz: ## each fuzzer for a short bounded time (hack/fuzz.sh)
	FUZZTIME=$(FUZZTIME) GO=$(GO) hack/fuzz.sh

image: ## container image (needs a container engine)
	docker build --build-arg VERSION=$(VERSION) -t $(IMAGE) .

clean:
	rm -rf bin
