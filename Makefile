# One entry point. `make run` and `make test` each set up what they need on a
# fresh clone; `make install` is idempotent and fast once done.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTHON := $(BIN)/python
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard protos/vpm/v1/*.proto)
PROTO_OUT := $(patsubst protos/%.proto,%_pb2.py,$(PROTO_SRC))

.PHONY: install protos run stop migrate test test-fast bench loadtest lint clean

install: $(STAMP) $(PROTO_OUT)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --disable-pip-version-check -c constraints.txt \
		-e '.[encoder,search,web,dev]' --config-settings editable_mode=compat
	@touch $@

protos: $(STAMP)
	@rm -f $(PROTO_OUT)
	@$(MAKE) --no-print-directory $(PROTO_OUT)

# The proto path mirrors the Python package (vpm/v1/...), so the generated
# modules import each other as `vpm.v1.x_pb2` without post-processing.
vpm/v1/%_pb2.py: protos/vpm/v1/%.proto $(STAMP)
	$(PYTHON) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $<

run: install
	$(PYTHON) -m demo.run

stop:
	-$(PYTHON) -m demo.run --stop

# Bring the catalog's schema to the latest revision (Alembic); the search service also
# does this at start. The catalog is VPM_CATALOG_URL (default: the SQLite file of make run).
migrate: install
	$(PYTHON) -m search_service.migrate

test: install
	$(PYTHON) -m pytest

# The unit and in-process tiers only: skips the real ViT-B-32 and real processes.
test-fast: install
	$(PYTHON) -m pytest -m "not slow"

bench: install
	$(PYTHON) -m bench

# Real encoder + search processes under a query mix, bounded in time (a few minutes).
loadtest: install
	$(PYTHON) -m bench.loadtest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf vpm build *.egg-info .pytest_cache .ruff_cache
