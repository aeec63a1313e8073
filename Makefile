# hearth — `make help` lists the targets.
GO      ?= go
BIN     := bin
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X main.version=$(VERSION)

.PHONY: help setup kernel build generate demo test test-unit verify bench clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

setup: ## install Debian packages and build the guest kernel (root; idempotent)
	scripts/setup.sh

kernel: ## build the guest kernel (cached by its inputs under ~/.cache/hearth/kernel)
	kernel/build.sh

build: ## build bin/hearth, bin/hearthd, bin/hearth-shim, bin/hearth-agent (static) and bin/hearth-mkimage
	CGO_ENABLED=0 $(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/hearth-agent ./cmd/hearth-agent
	$(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/hearth ./cmd/hearth
	$(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/hearthd ./cmd/hearthd
	$(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/hearth-shim ./cmd/hearth-shim
	$(GO) build -o $(BIN)/hearth-mkimage ./cmd/hearth-mkimage

generate: ## regenerate the CRDs, deep copies and OpenAPI models from the API types
	scripts/generate.sh

demo: setup build ## set everything up, build a busybox image locally and run a command in a VM
	$(BIN)/hearth-mkimage -o /tmp/hearth-demo -t latest
	$(BIN)/hearth run --local oci:/tmp/hearth-demo:latest -- sh -c 'echo "hello from a micro-VM: $$(uname -sr), $$(nproc) cpu, $$(id -un)"'

test: setup verify ## everything CI runs: setup, verify, then all tests with -race (root)
	$(GO) test -race -count=1 -timeout 30m ./...

test-unit: ## the tests that need no root, VM or registry
	$(GO) test -count=1 -short ./internal/guest/protocol/ ./internal/sandbox/ ./internal/cli/ ./internal/scheduler/ ./internal/hostlifecycle/ ./internal/logfile/

verify: ## gofmt, go vet, and go.mod tidy
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }
	$(GO) vet ./...
	@cp go.mod /tmp/hearth.go.mod.bak; cp go.sum /tmp/hearth.go.sum.bak; $(GO) mod tidy; \
	  if ! diff -q go.mod /tmp/hearth.go.mod.bak >/dev/null || ! diff -q go.sum /tmp/hearth.go.sum.bak >/dev/null; then \
	    cp /tmp/hearth.go.mod.bak go.mod; cp /tmp/hearth.go.sum.bak go.sum; echo "go mod tidy changes go.mod/go.sum"; exit 1; fi

bench: build ## hearth bench boot (hearth run vs a bare QEMU boot), api (API creates vs etcd puts), scheduler (placements/s, binds/s), warm (warm starts vs a bare restore), ingress (vs direct and nginx), policy (1,000 rules vs none)
	$(BIN)/hearth bench boot
	$(BIN)/hearth bench api
	$(BIN)/hearth bench scheduler
	$(BIN)/hearth bench warm
	$(BIN)/hearth bench ingress
	$(BIN)/hearth bench policy

clean: ## remove build outputs
	rm -rf $(BIN)
