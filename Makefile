# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv and install the pinned dependencies themselves.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch==2.13.0: the CPU wheel on CPU-only machines where one is provided locally; on a
# Linux machine with plain PyPI this is the CUDA build. Override for another build, e.g.
#   make demo TORCH_SPEC="torch==2.13.0 --index-url <your CPU or CUDA wheel index>"
TORCH_SPEC ?= torch==2.13.0

# Debian packages the tests use: the Fashion-MNIST data, a real Prometheus (promtool and the
# server, for the monitoring tests), Chromium (to render the console dashboards headless), and
# etcd and nginx (several replicas behind a stream-affine router, tests/deploy/test_replicas.py),
# and curl (the REST front as a person calls it, tests/serving/test_rest.py).
SYSTEM_PACKAGES := dataset-fashion-mnist prometheus chromium etcd-server nginx curl

.PHONY: install system-deps demo serve lint test bench clean

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

system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	  else echo "missing Debian packages:$$missing (run: sudo apt-get install$$missing); tests that need them will fail"; fi; \
	fi

lint: $(BIN)/.installed
	$(BIN)/ruff check .

test: $(BIN)/.installed system-deps
	$(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/tta bench

clean:
	rm -rf $(VENV) runtime/_generated .pytest_cache
