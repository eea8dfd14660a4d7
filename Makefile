# Two commands do everything on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel where there is no GPU (a plain `torch` would pull a multi-GB CUDA build); override with
# TORCH_SPEC="torch==X" on GPU machines or leave it empty there to keep the torch already matching CUDA.
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
# DeepSpeed JIT-compiles its CPU ops once; keep them where every clone can reuse them.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/guidedmix/torch_extensions
export DS_ACCELERATOR ?= $(if $(shell command -v nvidia-smi 2>/dev/null),cuda,cpu)
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: venv test demo bench clean

venv: $(VENV)/.installed

# constraints.txt pins the versions last seen working together: without it pip backtracks for many minutes
# over botocore (s3fs pins aiobotocore, moto wants boto3). Regenerate with `pip freeze` after an upgrade.
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	# build DeepSpeed's CPU communication op once, here: workers that compile it together at run time
	# wait on a lock file, and one killed mid-build leaves a lock that blocks every later run
	# with the venv's ninja first on PATH, as the workers have it (trainer/engine.py)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $@

test: venv
	$(VENV)/bin/pytest -q tests

demo: venv
	$(VENV)/bin/guidedmix demo --out runs/demo

clean:
	rm -rf $(VENV) runs data build *.egg-info
