# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv and install the pinned dependencies themselves.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch==2.13.0: the CPU wheel on CPU-only machines where one is provided locally; on a
# Linux machine with plain PyPI this is the CUDA build. Override for another build, e.g.
#   make demo TORCH_SPEC="torch==2.13.0 --index-url <your CPU or CUDA wheel index>"
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo serve test bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install $(TORCH_SPEC)
	$(BIN)/pip install -e '.[test]'
	$(BIN)/python -m runtime.protos
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/tta demo

serve: $(BIN)/.installed
	$(BIN)/tta serve

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/tta bench

clean:
	rm -rf $(VENV) runtime/_generated .pytest_cache
