# Pluggably: `make run` starts the gateway and Envoy; `make test` runs every test.
# Everything installs into .venv (Python) and node_modules (buf) inside the repository.

PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
BUF         := node_modules/.bin/buf
GRPC_PORT   ?= 50051
HTTP_PORT   ?= 8080
HTTP_HOST   ?= 127.0.0.1
ADMIN_PORT  ?= 9901
MODEL_DIR   := var/models/tiny-random-llama
IMAGE_MODEL_DIR := var/models/tiny-sd
MESH_MODEL_DIR := var/models/tiny-shape
# `make run` serves the offline demo model unless PLUGGABLY_CONFIG names another config.
PLUGGABLY_CONFIG ?= examples/demo.yaml
PROTOS      := $(wildcard proto/pluggably/v1/*.proto)
PYTEST_ARGS ?=

.PHONY: help install run test hosted-smoke generate check-generated lint breaking bench bench-gateway bench-overhead bench-admission bench-images \
	model clean

help:
	@echo "make run              start the gRPC server (:$(GRPC_PORT)) and Envoy REST/gRPC (:$(HTTP_PORT))"
	@echo "make test             run all tests"
	@echo "make generate         regenerate Python stubs, Envoy descriptor set and OpenAPI from proto/"
	@echo "make check-generated  fail if generated files are out of date"
	@echo "make lint             buf lint/format, ruff check/format, mypy (strict on core/)"
	@echo "make hosted-smoke     serve a hosted-provider request from a venv without [local]"
	@echo "make breaking         buf breaking against the released contract (proto/baseline/)"
	@echo "make bench            run the local text benchmarks in bench/"
	@echo "make bench-admission  admission under overload and fairness across keys"
	@echo "make bench-overhead   what auth, limits, metrics and the access log add per call"
	@echo "make bench-gateway    hosted-provider overhead: direct vs gRPC vs Envoy REST"
	@echo "make bench-images     local images: steps/s through the gateway vs diffusers directly"
	@echo "make model            build the tiny offline demo models into var/models"

install: $(VENV)/.installed node_modules/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit("Python 3.11+ is required, found " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned to the CPU build (see pyproject.toml); CUDA machines install it the same way.
	$(PY) -m pip install --quiet -e '.[local,dev,redis,tracing]'
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

model: $(MODEL_DIR)/config.json $(IMAGE_MODEL_DIR)/model_index.json $(MESH_MODEL_DIR)/model_index.json

$(MODEL_DIR)/config.json: | $(VENV)/.installed
	$(VENV)/bin/pluggably-make-tiny-model $(MODEL_DIR)

$(IMAGE_MODEL_DIR)/model_index.json: | $(VENV)/.installed
	$(VENV)/bin/pluggably-make-tiny-image $(IMAGE_MODEL_DIR)

$(MESH_MODEL_DIR)/model_index.json: | $(VENV)/.installed
	$(VENV)/bin/pluggably-make-tiny-mesh $(MESH_MODEL_DIR)

run: install model
	PLUGGABLY_CONFIG=$(PLUGGABLY_CONFIG) GRPC_PORT=$(GRPC_PORT) HTTP_PORT=$(HTTP_PORT) HTTP_HOST=$(HTTP_HOST) ADMIN_PORT=$(ADMIN_PORT) scripts/run.sh

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# A second venv (.venv-hosted) with only the base dependencies: the gateway must start and serve
# a hosted provider without torch. Independent of .venv on purpose, so it needs no `install`.
hosted-smoke:
	PYTHON=$(PYTHON) scripts/hosted_smoke.sh

generate: install
	$(PY) -m grpc_tools.protoc -I proto -I third_party/googleapis \
		--python_out=server --pyi_out=server --grpc_python_out=server $(PROTOS)
	$(BUF) build --as-file-descriptor-set -o envoy/pluggably.pb
	$(PY) -m pluggably.devtools.openapi_gen envoy/pluggably.pb -o envoy/openapi.json

# Read-only on git: `git status` lists modified and new (untracked) generated files alike.
check-generated: generate
	@stale=$$(git status --porcelain -- server/pluggably/v1 envoy/pluggably.pb envoy/openapi.json); \
	if [ -n "$$stale" ]; then echo "$$stale"; \
		echo "generated files are out of date: run 'make generate' and commit"; exit 1; fi

# The contract changes additively only. FILE rules against the contract as last released, and
# WIRE_JSON against the first release (9e4b693). FIELD_WIRE_JSON_COMPATIBLE_TYPE is excepted there
# for the one rename round (Message -> ChatMessage, same fields): buf compares message type names,
# so it flags any rename; tests/test_codegen.py checks that the renamed types kept every field.
breaking: install
	@mkdir -p build
	$(BUF) build --exclude-source-info -o build/contract.binpb
	$(BUF) breaking build/contract.binpb --against proto/baseline/v1.binpb \
		--config '{"version":"v2","breaking":{"use":["FILE"]}}'
	$(BUF) breaking build/contract.binpb --against proto/baseline/v1-foundation.binpb \
		--config '{"version":"v2","breaking":{"use":["WIRE_JSON"],"except":["FIELD_WIRE_JSON_COMPATIBLE_TYPE"]}}'

# mypy takes what to check, and how strictly, from pyproject.toml ([tool.mypy]).
lint: install
	$(BUF) lint
	$(BUF) format --diff --exit-code
	$(VENV)/bin/ruff check server tests bench
	$(VENV)/bin/ruff format --check server tests bench
	$(VENV)/bin/mypy

bench: install model
	$(PY) bench/bench_text.py --model-dir $(MODEL_DIR)
	$(PY) bench/bench_text.py --model-dir var/models/small-random-llama --size small --runs 5 --startup-runs 0

bench-gateway: install
	$(PY) bench/bench_gateway.py

bench-overhead: install
	$(PY) bench/bench_overhead.py

bench-images: install model
	$(PY) bench/bench_images.py --model-dir $(IMAGE_MODEL_DIR)

bench-admission: install model
	$(PY) bench/bench_admission.py --model-dir $(MODEL_DIR)

clean:
	rm -rf $(VENV) .venv-hosted node_modules var build .pytest_cache
