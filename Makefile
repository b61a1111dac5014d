# Two commands on a fresh machine: `make demo` (install + the main job) and `make test` (install + tests).
# torch/torchvision are installed first, pinned to the releases on this machine's disk; pyproject keeps a range.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.14.1 torchvision==0.29.1
DATA   ?= ../shared/data
RUN    ?= runs/demo

.PHONY: install demo test zoo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# The main job: a short stage1 -> stage2 -> fuse on the CIFAR-10 copy found in $(DATA).
demo: install
	$(PY) -m models
	$(PY) -m train.stage1 -m reduce20 --dataset cifar10 --data-dir $(DATA) --subset 5000 --epochs 5 \
		--out $(RUN)/teacher --overwrite
	$(PY) -m train.stage2 --inherit $(RUN)/teacher --lora-rank 8 --lambda-epochs 2 --epochs 4 --subset 5000 \
		--data-dir $(DATA) --out $(RUN)/student --overwrite

test: install
	$(PY) -m pytest -q

zoo: install
	$(PY) -m models

clean:
	rm -rf $(VENV) runs
