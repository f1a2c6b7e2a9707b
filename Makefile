# Two commands: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test test-fast clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/cloudless-fl run

test: install
	$(BIN)/python -m pytest -q

test-fast: install  ## skip the tests that start real Flower engines
	$(BIN)/python -m pytest -q -m "not integration"

clean:
	rm -rf outputs multirun .pytest_cache
