# hearth — `make help` lists the targets.
GO      ?= go
BIN     := bin
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X main.version=$(VERSION)

.PHONY: help setup kernel kube-apiserver build generate demo test test-unit verify bench clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

setup: ## install Debian packages and build the guest kernel (root; idempotent)
	scripts/setup.sh

kernel: ## build the guest kernel (cached by its inputs under ~/.cache/hearth/kernel)
	kernel/build.sh

build: ## build bin/hearth, bin/hearthd, bin/hearth-shim, bin/hearth-agent and bin/hearth-jailer (static), bin/hearth-bench and bin/hearth-mkimage
	CGO_ENABLED=0 $(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/hearth-agent ./cmd/hearth-agent
	CGO_ENABLED=0 $(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/hearth-jailer ./cmd/hearth-jailer
	$(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/hearth ./cmd/hearth
	$(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/hearthd ./cmd/hearthd
	$(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/hearth-shim ./cmd/hearth-shim
	$(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/hearth-bench ./cmd/hearth-bench
	$(GO) build -o $(BIN)/hearth-mkimage ./cmd/hearth-mkimage

generate: ## regenerate the CRDs, deep copies and OpenAPI models from the API types
	scripts/generate.sh

demo: setup build ## set everything up, build a busybox image locally and run a command in a VM
	$(BIN)/hearth-mkimage -o /tmp/hearth-demo -t latest
	$(BIN)/hearth run --local oci:/tmp/hearth-demo:latest -- sh -c 'echo "hello from a micro-VM: $$(uname -sr), $$(nproc) cpu, $$(id -un)"'

# The e2e package boots many VMs one after another under TCG: it gets a
# timeout of its own, and runs after the rest so that the two do not share
# the 2 cores. The rest includes cmd/hearth-bench's smoke run of every
# benchmark (TestSmoke). Between them, fuzzing the host's side of the guest
# protocol (a failing input is saved under internal/sandbox/testdata/fuzz,
# and then replayed by every go test): 50,000 inputs (about 15 s here), a
# count and not a time, since Go 1.26's fuzzing coordinator can fail a
# duration-bounded run with a bare "context deadline exceeded" when its
# workers are starved at the deadline (golang/go#75804; it did in CI).
test: setup verify kube-apiserver ## everything CI runs: setup, verify, then all tests with -race (root)
	$(GO) test -race -count=1 -timeout 30m $$($(GO) list ./... | grep -v '/e2e$$')
	$(GO) test -run '^$$' -fuzz '^FuzzSession$$' -fuzztime 50000x -timeout 10m ./internal/sandbox
	$(GO) test -race -count=1 -timeout 40m ./e2e

kube-apiserver: ## build kube-apiserver (the API benchmark's baseline; cached by version under ~/.cache/hearth)
	scripts/kube-apiserver.sh >/dev/null

test-unit: ## the tests that need no root, VM or registry
	$(GO) test -count=1 -short ./internal/guest/protocol/ ./internal/sandbox/ ./internal/cli/ ./internal/scheduler/ ./internal/hostlifecycle/ ./internal/logfile/ ./internal/bench/ ./cmd/hearth-bench/

verify: ## gofmt, go vet, and go.mod tidy
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }
	$(GO) vet ./...
	@cp go.mod /tmp/hearth.go.mod.bak; cp go.sum /tmp/hearth.go.sum.bak; $(GO) mod tidy; \
	  if ! diff -q go.mod /tmp/hearth.go.mod.bak >/dev/null || ! diff -q go.sum /tmp/hearth.go.sum.bak >/dev/null; then \
	    cp /tmp/hearth.go.mod.bak go.mod; cp /tmp/hearth.go.sum.bak go.sum; echo "go mod tidy changes go.mod/go.sum"; exit 1; fi

BENCH_OUT ?= bench-$(VERSION).jsonl

bench: build kube-apiserver ## every benchmark at full size, JSON lines in $(BENCH_OUT) (compare two with bin/hearth-bench compare A B)
	$(BIN)/hearth-bench all --out $(BENCH_OUT)

clean: ## remove build outputs
	rm -rf $(BIN)
