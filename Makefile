# zenith — set-up and checks. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install compile test lint bench demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# a second S3 look-alike for the bucket tests (one without conditional writes)
	npm install --silent --no-save --no-audit --no-fund --prefix $(VENV)/node s3rver@3.7.1
	touch $(STAMP)

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

# Byte-compile explicitly: PYTHONDONTWRITEBYTECODE (set on some machines) would otherwise make
# every `zenith` process compile its modules from source again.
compile: install
	$(BIN)/python -m compileall -q src tests benchmarks >/dev/null

test: compile
	$(BIN)/python -m pytest -q

bench: compile
	PYTHONPATH=. $(BIN)/python -m benchmarks.run

demo: compile
	$(BIN)/python -m zenith.demo

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
