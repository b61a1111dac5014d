# Two commands on a fresh machine: `make demo` (install + the main job) and `make test` (install + tests).
# torch/torchvision are installed first, pinned to the releases on this machine's disk; pyproject keeps a range.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.14.1 torchvision==0.29.1
DATA   ?= ../shared/data
RUN    ?= runs/demo

.PHONY: install demo test test-fast zoo gpu-check clean

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

# The fast loop while editing: the unit tests only (no end-to-end training), under 2 minutes on 2 CPU cores.
test-fast: install
	$(PY) -m pytest -q -m "not e2e"

zoo: install
	$(PY) -m models

# A GPU's checks in one call of at most 10 minutes (the GPU speed issue), in the issue's order, each step under its
# own time limit so that the call always returns what it measured:
#  1. train.bench on CUDA, reduce20, ours with the whole step as one CUDA graph (--cuda-graph, eager kernels): the
#     paths side by side with the kernel-time column (top kernels and host ops in profile-graph/), then N = 1, 2, 4,
#     8 teachers trained at once, first as threads of one process on a CUDA stream each (their kernels may run side
#     by side), then as processes (as `--jobs` runs rows: without MPS they take turns on the chip);
#  2. when step 1 did not measure the captured step (its teacher row missing): train.bench with torch.compile's
#     reduce-overhead instead (CUDA graphs of the forward and backward, the optimizer outside), BENCH2_S seconds;
#  3. the reduce20-w1 rows of `cifar10-reducenet --budget full` (paper recipe, SEEDS), JOBS rows at once, with
#     --cuda-graph when step 1 measured it (then step 2's time too, ROWS_S + BENCH2_S seconds; eagerly otherwise,
#     ROWS_S); a row cut short resumes from its last epoch when the target runs again on the same machine.
# OUT gets bench.txt, bench-compile.txt, rows.log and gpu-check.tgz, the archive of everything else (gpu.txt,
# profiles, row logs, metrics, results) that WORK, outside OUT, collects: few files, as the device tool returns at
# most 8 (on the device, make takes OUT from the tool's environment variable). The archive is written again after
# each step, so a call cut short still returns what its finished steps wrote. DATA must hold cifar10-jpeg.zip (the
# zip and the working tree fill about 62.6 of the 64 MiB a call may carry; Torch-Pruning, which the GPU machines
# lack, is imported by trims alone):
#   mkdir -p .device-data && cp ../shared/data/cifar10-jpeg.zip .device-data/
#   then on the device: make gpu-check DATA=.device-data   (carry .device-data)
# A step whose limit is 0 is skipped: a call for the rows alone, once bench has shown --cuda-graph works, is
#   make gpu-check DATA=.device-data BENCH_S=0 ROWS_S=570 BENCH2_S=0 ROWS_GRAPH=--cuda-graph
# (runs do not outlive the session's machine: the rows must finish within one session's device time).
# Runs with the python that holds torch (no install: the GPU machine has every other package these import).
OUT          ?= runs/gpu-check
WORK         ?= runs/gpu-check-work
BENCH_S      ?= 200
ROWS_S       ?= 270
BENCH2_S     ?= 100
ROWS_GRAPH   ?=
GPU          ?= cuda
SEEDS        ?= 0
JOBS         ?= 3
PACK_WORK     = tar czf $(OUT)/gpu-check.tgz -C $(WORK) .
gpu-check:
	mkdir -p $(OUT) $(WORK)
	-nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $(WORK)/gpu.txt 2>&1
	-[ $(BENCH_S) -gt 0 ] && PYTHONUNBUFFERED=1 timeout $(BENCH_S) $(PYTHON) -m train.bench --device $(GPU) \
		--models reduce20 --steps 40 --workers 8 --data-dir $(DATA) --cuda-graph --no-compile --pack 1 2 4 8 \
		--pack-mode streams processes --profile-dir $(WORK)/profile-graph > $(OUT)/bench.txt 2>&1
	$(PACK_WORK)
	-if grep -qs '^| reduce20 | teacher' $(OUT)/bench.txt; then \
		GRAPH=--cuda-graph; ROWS=$$(($(ROWS_S) + $(BENCH2_S))); \
	else GRAPH=$(ROWS_GRAPH); ROWS=$(ROWS_S); [ $(BENCH2_S) -gt 0 ] && PYTHONUNBUFFERED=1 timeout $(BENCH2_S) \
		$(PYTHON) -m train.bench --device $(GPU) --models reduce20 --steps 40 --workers 8 --data-dir $(DATA) \
		--compile-mode reduce-overhead --profile-dir $(WORK)/profile-compile > $(OUT)/bench-compile.txt 2>&1; \
		$(PACK_WORK); fi; \
		echo "rows: $${GRAPH:-eager}, $$ROWS s" > $(OUT)/rows.log; [ $$ROWS -gt 0 ] && PYTHONUNBUFFERED=1 \
		timeout $$ROWS $(PYTHON) -m train.reproduce cifar10-reducenet \
		--budget full --models reduce20 --widths 1 --recipes paper --no-lora-rows --seeds $(SEEDS) --device $(GPU) \
		$$GRAPH --jobs $(JOBS) --data-dir $(DATA) --runs runs/gpu --results $(WORK)/results >> $(OUT)/rows.log 2>&1
	-cd runs/gpu/cifar10-reducenet 2>/dev/null && for run in */; do [ $$run = logs/ ] && continue; \
		mkdir -p $(abspath $(WORK))/runs/$$run && \
		cp $$run/metrics.csv $$run/args.json $$run/summary.json $(abspath $(WORK))/runs/$$run 2>/dev/null; done; \
		cp -r logs $(abspath $(WORK))/ 2>/dev/null
	$(PACK_WORK)

clean:
	rm -rf $(VENV) runs
