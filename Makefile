# cellexplain: the two commands are `make serve` and `make test` (see README).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# models live in BentoML's own store (~/bentoml, or $BENTOML_HOME), the one the `cellexplain`
# command and `bentoml` find from any shell: make sets nothing the user's shell lacks
DEFAULT_MODEL := pbmc-programs
DEFAULT_DIR := artifacts/$(DEFAULT_MODEL)
# what ruff checks (src/cellexplain holds the package root; pyproject.toml maps the folders)
SOURCES := src setup.py models service client api tests benchmarks load_tests tools deploy/pin.py

.PHONY: install proto serve test test-deploy lint typecheck docs unit integration default-model compare clean \
	bento bento-gpu image pin manifests load-test bench install-gpu wheel

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[serve,report,train,formats,dev]'
	touch $@

# recompile the gRPC protos (api/protos) into api/_generated after editing one (installing the
# package compiles them: setup.py)
proto: $(VENV)/.installed
	$(PY) api/codegen.py --force

install: $(VENV)/.installed

# on a CUDA machine: onnxruntime-gpu in place of onnxruntime (they cannot share an environment).
# PyPI's onnxruntime-gpu is built for CUDA 12 up to 1.26, for CUDA 13 from 1.27: CUDA 13
# machines (driver >= 580) take `make install-gpu ORT_GPU='onnxruntime-gpu>=1.27'`
ORT_GPU ?= onnxruntime-gpu>=1.20,<1.27
install-gpu: $(VENV)/.installed
	$(PY) -m pip uninstall --quiet --yes onnxruntime
	$(PY) -m pip install --quiet '$(ORT_GPU)'

# the default model: reuse the store's, else import the trained folder, else train it
default-model: $(VENV)/.installed
	@$(BIN)/cellexplain models show $(DEFAULT_MODEL) >/dev/null 2>&1 || \
		$(BIN)/cellexplain models import $(DEFAULT_DIR) 2>/dev/null || \
		$(BIN)/cellexplain train --arch programs --name $(DEFAULT_MODEL) --out $(DEFAULT_DIR) --import
	@$(BIN)/cellexplain models list

# REST on CELLEXPLAIN_HTTP_PORT (3000), gRPC on CELLEXPLAIN_GRPC_PORT (50051); see README.
# After SIGTERM, HTTP requests still running after CELLEXPLAIN_SHUTDOWN_GRACE_S are cancelled.
serve: default-model
	$(BIN)/bentoml serve cellexplain.service.rest:CellExplain \
		--timeout-graceful-shutdown $$(printf '%.0f' "$${CELLEXPLAIN_SHUTDOWN_GRACE_S:-30}")

lint: install
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)

# mypy over cellexplain.* as installed (tools/typecheck.py maps the folders), then the client's
# modules on the oldest Python the client supports
typecheck: install
	$(PY) tools/typecheck.py
	$(PY) tools/typecheck.py --client --python-version 3.10

unit: install
	$(BIN)/pytest tests/unit -q

integration: install
	$(BIN)/pytest tests/integration -q -n $(TEST_WORKERS) --dist loadfile -m "not deploy"

# the manual (docs/) as a site in build/site; --strict: a broken link or anchor fails the build
docs: install
	$(BIN)/mkdocs build --strict --quiet

# the suite (unit tests, and integration tests against real servers) on TEST_WORKERS processes,
# each test file on one of them (its servers started once): on 2 cores 3 keep both busy, since
# most of an integration test waits on a server or a process
TEST_WORKERS ?= 3
test: lint typecheck docs
	$(BIN)/pytest tests -q -n $(TEST_WORKERS) --dist loadfile -m "not deploy"

# what ships, built and run as it is deployed (the image as a pod under podman: root; the
# Bentos; the wheel in fresh venvs on each client Python) and the load tests' SLOs, one test at
# a time (they time and measure the machine); CI runs it after `make test`
test-deploy: install
	$(BIN)/pytest tests -q -m deploy

# the project's sdist, and its wheel built from the unpacked sdist (the Bentos install it), with
# the gRPC modules compiled into both
wheel: install
	rm -rf dist
	$(PY) -m build --outdir dist . >/dev/null

# Bentos (docs/deploy.md): the project's wheel, its models and the serving requirements
bento: default-model wheel
	$(BIN)/bentoml build -f bentofile.yaml .

bento-gpu: default-model wheel
	$(BIN)/bentoml build -f bentofile.gpu.yaml .

# the OCI image of a Bento (default: the newest cellexplain), built with podman from Debian
# packages and PyPI, no image registry needed (docs/deploy.md, section 1; needs root, podman,
# runc, debootstrap). Prints localhost/NAME:VERSION
BENTO ?= cellexplain:latest
image: bento
	BENTOML=$(BIN)/bentoml PYTHON=$(PY) deploy/image/build.sh $(BENTO)

# pin an overlay to a Bento: the image tag and the model versions it carries
# (docs/deploy.md, "Roll out a new model"): make pin OVERLAY=cpu IMAGE=registry.example.org/lab/cellexplain
OVERLAY ?= cpu
pin: BENTO = $(if $(filter gpu,$(OVERLAY)),cellexplain-gpu,cellexplain):latest
pin: install
	$(PY) deploy/pin.py deploy/overlays/$(OVERLAY) $(BENTO) $(if $(IMAGE),--image $(IMAGE),)

# the Kubernetes objects each overlay applies (needs kubectl or kustomize)
manifests:
	kubectl kustomize deploy/overlays/cpu
	kubectl kustomize deploy/overlays/gpu

# load tests against a running server (make serve): Locust on REST, the gRPC driver, SLOs
URL ?= http://localhost:3000
GRPC ?= localhost:50051
USERS ?= 16
DURATION ?= 300
load-test: install
	mkdir -p load_tests/results
	@rest=0; grpc=0; \
	$(BIN)/locust -f load_tests/locustfile.py --headless --host $(URL) -u $(USERS) -r 4 \
		-t $(DURATION)s --csv load_tests/results/rest --html load_tests/results/rest.html \
		|| rest=$$?; \
	$(PY) -m load_tests.grpc_load --target $(GRPC) --metrics-url $(URL) --users $(USERS) \
		--duration $(DURATION) --csv load_tests/results/grpc.csv || grpc=$$?; \
	echo "load test: REST exit $$rest, gRPC exit $$grpc"; test $$rest -eq 0 -a $$grpc -eq 0

# every table in docs/benchmarks.md (~18 min on 2 cores; QUICK=1 for a few minutes)
bench: default-model
	$(PY) -m benchmarks $(if $(QUICK),--quick,)

compare: install
	$(BIN)/cellexplain compare --seeds 5

clean:
	rm -rf $(VENV) artifacts build dist .mypy_cache .ruff_cache .pytest_cache
