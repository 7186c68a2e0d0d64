# `make install` then `make test` (README). EXTRA=gpu on a GPU machine (auto-detected).
VENV  ?= .venv
PY    := $(VENV)/bin/python
EXTRA ?= $(shell if command -v nvidia-smi >/dev/null 2>&1 && [ -e /dev/nvidia0 ]; then echo gpu; else echo cpu; fi)

.PHONY: install test unit e2e check clean

install:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e ".[$(EXTRA),dev]"
ifeq ($(EXTRA),cpu)
	@# pip pulls CUDA builds of these beside torch 2.13.0+cpu; each breaks `import vllm`.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
endif
	$(PY) -c "import vllm, nixl; print('pdtui install ok: vllm', vllm.__version__)"

test:
	$(PY) -m pytest -v tests

unit:
	$(PY) -m pytest -v tests/unit

e2e:
	$(PY) -m pytest -v tests/e2e

check:
	$(VENV)/bin/ruff check pdtui tests
	$(PY) -m pytest -v tests

clean:
	rm -rf $(VENV) .pytest_cache
