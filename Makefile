# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint typecheck pytest protos protos-check bench bench-durable docs ui-screenshots clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# The distribution was called "mesh" before it was renamed structlog-mesh.
	$(PY) -m pip uninstall --quiet --yes mesh 2>/dev/null || true
	$(PY) -m pip install --quiet -e '.[dev,otel]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP) lint typecheck pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check mesh services scripts tests examples
	$(VENV)/bin/ruff format --check mesh services scripts tests examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# Debian packages the tests use (chromium: the browser tests, mesh ui's and the HTML diagram's;
# postgresql: the shared journal). The script installs the missing ones when it can; a test
# whose package is still missing is skipped, naming it.
TEST_DEBS := chromium postgresql

pytest: $(STAMP)
	scripts/ensure-debian-packages.sh $(TEST_DEBS)
	$(VENV)/bin/pytest -q

# The same checks without the tests marked slow (soak, bench, the long fault tests).
test-fast: $(STAMP) lint typecheck
	scripts/ensure-debian-packages.sh $(TEST_DEBS)
	$(VENV)/bin/pytest -q -m "not slow"

# Regenerate the Python stubs from protos/ (committed; CI checks they are current).
protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/mesh/v1/mesh.proto

protos-check: protos
	git diff --exit-code -- mesh/v1 || (echo "mesh/v1 is stale: run 'make protos' and commit" >&2; exit 1)

# The side-by-side benchmark (scripts/bench.py): `make bench`, or `make bench BENCH_ARGS=--quick`.
# Celery and redis-py come from the bench extra, redis-server from Debian; without
# them the script says so and measures the rest.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	@command -v redis-server >/dev/null || apt-get install -y -q redis-server >/dev/null 2>&1 \
		|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q redis-server >/dev/null 2>&1) \
		|| echo "redis-server could not be installed: the Celery chain will be left out"
	$(PY) scripts/bench.py $(BENCH_ARGS)

# Durable flows against plain ones and DBOS Transact (scripts/bench_durable.py):
# `make bench-durable`, or `make bench-durable BENCH_ARGS=--quick` / `BENCH_ARGS="--recover 1000"`.
bench-durable: $(BENCH_STAMP)
	$(PY) scripts/bench_durable.py $(BENCH_ARGS)

# The documentation site (docs/, mkdocs.yml) into site/; --strict: a broken link fails it.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# The screenshots of mesh ui in docs/ui.md (docs/images/ui-*.png), taken of a real mesh
# in headless Chromium by scripts/ui_screenshots.py; run it after changing the pages.
ui-screenshots: $(STAMP)
	scripts/ensure-debian-packages.sh chromium
	$(PY) scripts/ui_screenshots.py

clean:
	rm -rf $(VENV) .mesh-data .pytest_cache .mypy_cache .ruff_cache site
