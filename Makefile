# hookrun: `make dev` runs it locally, `make test` tests it. See README.md.
SHELL := /bin/bash
CARGO ?= cargo
CLUSTER := $(CARGO) run -q -p hookrun-tests --bin hookrun-cluster --

.PHONY: all test unit-test tools peer-tools cluster-up cluster-down crds fmt lint dev bench clean-tools images deploy fuzz install-cli

all: test

## tools: build etcd, kube-apiserver, kube-controller-manager, kubectl, helm and crane from Go modules
tools:
	@tools/build.sh

## peer-tools: build the peer `make bench` measures beside hookrun (Flux's
## notification-controller) from Go modules; cached, never part of `make tools` or CI
peer-tools:
	@tools/peer.sh

## test: every test, unit and cluster, after making sure the tools exist
test: tools
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace

## cluster-up: start the local control plane (reuses a running one)
cluster-up: tools
	@$(CLUSTER) up

## cluster-down: stop every process cluster-up started and remove its state
cluster-down:
	@$(CLUSTER) down

## images: static binaries and OCI image tarballs in target/images/, without a container daemon
images: tools
	@images/build.sh

## deploy: make images, push them with crane to REGISTRY and helm upgrade --install the
## chart with those images by digest and PUBLIC_URL, e.g.
##   make deploy REGISTRY=ghcr.io/my-org PUBLIC_URL=https://hooks.example.com
## (optional: RELEASE, NAMESPACE, HELM_ARGS, INSECURE=1; see images/deploy.sh)
deploy: tools
	@REGISTRY="$(REGISTRY)" PUBLIC_URL="$(PUBLIC_URL)" RELEASE="$(RELEASE)" \
	  NAMESPACE="$(NAMESPACE)" HELM_ARGS="$(HELM_ARGS)" INSECURE="$(INSECURE)" images/deploy.sh

## install-cli: build the kubectl plugin (release) and install it as PREFIX/bin/kubectl-hookrun
## (default PREFIX: ~/.cargo, whose bin/ is usually on PATH), so `kubectl hookrun` finds it
PREFIX ?= $(HOME)/.cargo
install-cli:
	$(CARGO) build --release --locked -p kubectl-hookrun
	install -D -m 0755 "$$($(CARGO) metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release/kubectl-hookrun" "$(PREFIX)/bin/kubectl-hookrun"
	@echo "installed $(PREFIX)/bin/kubectl-hookrun; try: kubectl hookrun --help"

## crds: regenerate crds/manifests and the chart's crds/ from the Rust types
crds:
	$(CARGO) run -q -p hookrun-crds --bin crdgen
	$(CARGO) run -q -p hookrun-crds --bin crdgen charts/hookrun/crds

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## dev: build, start a local control plane, the operator, the apiserver and a local pod
## runner, apply examples/ and print each Agent's webhook URL; Ctrl-C stops it all
dev:
	@CARGO="$(CARGO)" tools/dev.sh

# The soak's length in make bench; the bench alone defaults to 600 s.
SOAK_SECONDS ?= 120

## bench: the operator on the local control plane, the webhook door under wrk, held wait-mode
## requests, the door beside the peer and a bare server, and the door under slow clients
## and a soak of SOAK_SECONDS (target/bench/report.md)
bench: tools peer-tools
	@command -v wrk >/dev/null || { echo "make bench needs wrk: apt-get install wrk"; exit 1; }
	$(CARGO) build --release --workspace --bins
	$(CARGO) bench -p hookrun-tests --bench operator
	$(CARGO) bench -p hookrun-apiserver --bench webhook
	$(CARGO) bench -p hookrun-apiserver --bench expressions
	$(CARGO) bench -p hookrun-apiserver --bench wait
	$(CARGO) bench -p hookrun-tests --bench peer
	HOOKRUN_SOAK_SECONDS=$(SOAK_SECONDS) $(CARGO) bench -p hookrun-tests --bench faults

## fuzz: every fuzz target for FUZZ_SECONDS seconds of CPU each (stable Rust; a crash is
## saved under fuzz/regressions/<target>/ and replayed by make test from then on)
FUZZ_SECONDS ?= 60
fuzz:
	$(CARGO) run -q -p hookrun-fuzz -- --seconds $(FUZZ_SECONDS)
