# Two commands on a fresh machine: `make demo` (install + the main job) and `make test` (install + tests).
# torch/torchvision are installed first, pinned to the releases on this machine's disk; pyproject keeps a range.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.14.1 torchvision==0.29.1
DATA   ?= ../shared/data
RUN    ?= runs/demo

.PHONY: install demo test zoo gpu-check clean

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

# A GPU's checks in one call of at most 10 minutes (the speed issue's item 4): train.bench on CUDA, then a
# 200-epoch reduce20 teacher with torch.compile, each under its own time limit so that the call always returns
# what it measured (a teacher cut short leaves its metrics.csv: the epochs it trained and their times).
# OUT gets the logs; DATA must hold cifar10-jpeg.zip. Runs with the python that holds torch (no install: the
# GPU machine has every package stage1 and bench import).
OUT        ?= runs/gpu-check
BENCH_S    ?= 200
TEACHER_S  ?= 330
GPU        ?= cuda
gpu-check:
	mkdir -p $(OUT)
	-nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $(OUT)/gpu.txt 2>&1
	-PYTHONUNBUFFERED=1 timeout $(BENCH_S) $(PYTHON) -m train.bench --device $(GPU) --models reduce20 \
		--data-dir $(DATA) > $(OUT)/bench.txt 2>&1
	-PYTHONUNBUFFERED=1 timeout $(TEACHER_S) $(PYTHON) -m train.stage1 -m reduce20 --epochs 200 --compile \
		--device $(GPU) --data-dir $(DATA) --out runs/gpu-teacher --overwrite > $(OUT)/teacher.log 2>&1
	-cp runs/gpu-teacher/metrics.csv runs/gpu-teacher/args.json runs/gpu-teacher/summary.json $(OUT)/

clean:
	rm -rf $(VENV) runs
