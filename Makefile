# Two commands: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test test-fast mutation clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

DEMO_DIR := outputs/demo

demo: install  ## FedAvg vs MA vs ASGD-GA on geo4 (Flower Simulation Engine), then their comparison
	rm -rf $(DEMO_DIR)
	$(BIN)/cloudless-fl run -m strategy=fedavg,ma,asgd_ga,asgd_ga_delta hydra.sweep.dir=$(DEMO_DIR)
	$(BIN)/cloudless-fl report $(DEMO_DIR)

test: install
	$(BIN)/python -m pytest -q

test-fast: install  ## skip the tests that start real Flower engines or the quick reproduction suite
	$(BIN)/python -m pytest -q -m "not integration and not suite"

mutation: install  ## mutation testing (mutmut) of strategies, validation, cost/region model, scheduler: hours on 2 cores
	$(BIN)/python -m pip install --quiet --disable-pip-version-check 'mutmut==3.8.1'
	OMP_NUM_THREADS=1 $(BIN)/mutmut run  # a forked mutant cannot use an OpenMP team its parent started
	$(BIN)/mutmut results

clean:
	rm -rf outputs multirun .pytest_cache mutants
