PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install data demo test fuzz lint bench reliability clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Fashion-MNIST's files (the quickstart's data) from the Debian package, into protege's cache
# ($PROTEGE_CACHE/fashion-mnist, by default ~/.cache/protege/fashion-mnist). When it cannot get them it
# says what to do and make goes on (the leading -): the tests that need the files skip.
data:
	-sh scripts/fetch_fashion_mnist.sh

demo: install data
	$(BIN)/protege quickstart

test: install data
	$(BIN)/lint-imports  # the layers of docs/architecture.md: imports only go down, no cycle
	$(BIN)/python -m pytest tests

fuzz: install  # the config fuzz at length: 1000 fresh random configs (make test runs 40 fixed ones)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest tests/test_fuzz_config.py

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports

bench: install
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/quickstart_seeds.py
	$(BIN)/python benchmarks/cache.py
	$(BIN)/python benchmarks/method_table.py

reliability: install  # the table of BENCHMARKS.md "Reliability"
	$(BIN)/python benchmarks/reliability.py --fuzz 1000

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
