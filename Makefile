# MLaaS Hub — `make up` runs the platform on this machine, `make test` runs the whole suite.
VENV        ?= .venv
# Debian's interpreter: per-user accounts must be able to run the servers' Python
# (a pyenv build under /root is not reachable by them).
BASE_PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || command -v python3)
PYTEST_ARGS ?=

PY_STAMP   := $(VENV)/.installed
NODE_STAMP := node_modules/.installed
# the experiment tracking server (mlaas.tracking) in an environment of its own: MLflow's server pins
# its own SQLAlchemy, Alembic and Flask, which must not move the hub's (the tracking image's pin)
MLFLOW_VENV  := $(VENV)-mlflow
MLFLOW_STAMP := $(MLFLOW_VENV)/.installed
MLFLOW_REQS  := images/tracking/requirements.txt

.PHONY: install up down test bench bench-k8s check-profiles images deploy k8s-build k8s-up k8s-down clean

install: $(PY_STAMP) $(NODE_STAMP) $(MLFLOW_STAMP)

$(MLFLOW_STAMP): $(MLFLOW_REQS)
	test -x $(MLFLOW_VENV)/bin/python || $(BASE_PYTHON) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/pip install -q --upgrade pip
	$(MLFLOW_VENV)/bin/pip install -q -r $(MLFLOW_REQS)
	touch $@

$(PY_STAMP): pyproject.toml
	@$(BASE_PYTHON) -c "import ensurepip" 2>/dev/null || { \
	  echo "Python's venv module is missing: install it (Debian: apt-get install python3-venv)"; exit 1; }
	test -x $(VENV)/bin/python || $(BASE_PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	$(VENV)/bin/python -m mlaas.user_site  # users' own packages (hub/mlaas/user_site.py)
	touch $@

$(NODE_STAMP): package.json package-lock.json
	@command -v npm >/dev/null || { echo "npm is missing: install Node.js 20+ (Debian: apt-get install nodejs npm)"; exit 1; }
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

up: install
	$(VENV)/bin/mlaas up

down:
	$(VENV)/bin/mlaas down

check-profiles: $(PY_STAMP)
	$(VENV)/bin/mlaas profiles check

test: install
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/python bench/form_bench.py
	$(VENV)/bin/python bench/data_bench.py
	$(VENV)/bin/python bench/spawn_bench.py
	$(VENV)/bin/python bench/backup_bench.py
	$(VENV)/bin/python bench/tracking_bench.py

# --- Kubernetes deployment (docs/deploy.md) ----------------------------------------------------
IMAGE_PREFIX ?= ghcr.io/mlaas-hub
IMAGE_TAG    ?= 0.1.0
IMAGES       := user-cpu user-cuda hub gateway xcache tracking
SITE         ?= site-a

images:
	@engine=""; \
	if command -v docker >/dev/null && docker info >/dev/null 2>&1; then engine=docker; \
	elif command -v buildah >/dev/null; then engine=buildah; \
	elif command -v podman >/dev/null && podman info >/dev/null 2>&1; then engine=podman; fi; \
	if [ -z "$$engine" ]; then \
	  echo "No container engine here (docker with a running daemon, buildah or podman): the images cannot be built on this machine."; \
	  echo "make test checks their Dockerfiles (hadolint, pinned packages)."; exit 1; fi; \
	for image in $(IMAGES); do \
	  echo "== $(IMAGE_PREFIX)/$$image:$(IMAGE_TAG)"; \
	  case "$$engine" in \
	    *buildah) $$engine bud -f images/$$image/Dockerfile -t $(IMAGE_PREFIX)/$$image:$(IMAGE_TAG) . ;; \
	    *) $$engine build -f images/$$image/Dockerfile -t $(IMAGE_PREFIX)/$$image:$(IMAGE_TAG) . ;; \
	  esac || exit 1; \
	done

deploy: $(PY_STAMP)
	$(VENV)/bin/mlaas deploy charts/sites/$(SITE)

# --- a real control plane with simulated GPU nodes, for tests (tests/cluster) --------------------
NAME  ?= site-a
NODES ?= tests/cluster/nodes.yaml

k8s-build:
	bash tests/cluster/build.sh

k8s-up: $(PY_STAMP)
	$(VENV)/bin/python tests/cluster/cluster.py up --name $(NAME) --nodes $(NODES)

k8s-down:
	$(VENV)/bin/python tests/cluster/cluster.py down --name $(NAME)

bench-k8s: install
	$(VENV)/bin/python bench/k8s_bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(MLFLOW_VENV) node_modules .test-state test-artifacts
