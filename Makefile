# Both targets build a private virtualenv from nothing, install pyvmx into it and run.
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin

.PHONY: demo test fuzz bench typecheck lint accel clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==25.3"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/pyvmx demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest

# The fuzz suite at its full size (CI runs it at scale 1 inside `make test`): the file-mutation and
# RSP-packet counts times FUZZ_SCALE, the guest-input counts times GUEST_FUZZ_SCALE (>= 100,000
# guest inputs). Ends with the inputs by generator and the outcomes by kind.
FUZZ_SCALE ?= 10
GUEST_FUZZ_SCALE ?= 120
fuzz: $(BIN)/.installed
	PYVMX_FUZZ_SCALE=$(FUZZ_SCALE) PYVMX_GUEST_FUZZ_SCALE=$(GUEST_FUZZ_SCALE) $(BIN)/python -m pytest tests/fuzz -p no:cacheprovider

# The accelerated engine: Unicorn built from its pinned source with pyvmx's patch (cached; about
# a minute of compiling). Use it with PYVMX_ENGINE=accel (or auto).
accel: $(BIN)/.installed
	$(BIN)/python -m pyvmx.engine.accel build

typecheck: $(BIN)/.installed
	$(BIN)/python -m mypy

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks

bench: $(BIN)/.installed
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .hypothesis
