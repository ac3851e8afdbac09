# Quick start: `make demo` (offline demo) and `make test` (test suite). Each sets up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel on these machines; on a CUDA machine the same pin gets the CUDA build from PyPI.
TORCH ?= torch==2.13.0

.PHONY: demo test bench webui gpu-wheels clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q "$(TORCH)"
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m toyworld.demo --output_dir outputs/demo

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q

webui: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m webui --adapters outputs/demo --demo

bench: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/adapter_overhead.py

# The wheels the GPU machine's image lacks (it has torch, transformers, accelerate, peft; no network there), and
# diffusers' script for the side-by-side runs (../shared does not travel to that machine).
gpu-wheels: $(VENV)/.installed
	$(VENV)/bin/python -m pip download -q --no-deps -d .gpu-wheels "diffusers==$$($(VENV)/bin/python -c 'import diffusers; print(diffusers.__version__)')"
	cp ../shared/reference/train_dreambooth_lora_sdxl.py .gpu-wheels/

clean:
	rm -rf $(VENV) outputs
