# The two set-up commands are `make quickstart` and `make test`; both create .venv if it is missing.
PY       ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed
# Everything Ray, MLflow and the tests write stays inside the workspace.
export RAY_USAGE_STATS_ENABLED := 0
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S := 0.2
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export TMPDIR := $(CURDIR)/.tmp
export RAY_TMPDIR := $(CURDIR)/.tmp

.PHONY: install quickstart test bench bench-learned bench-analysis lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@mkdir -p .tmp
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is named in the same command, pinned, so pip takes the CPU wheel on disk (not a CUDA build).
	$(BIN)/python -m pip install --quiet torch==2.13.0 -c constraints.txt -e '.[test]'
	@touch $(STAMP)

quickstart: install
	@mkdir -p .tmp
	$(BIN)/medrecon run pipelines/specs/quickstart.yaml

test: install
	@mkdir -p .tmp
	$(BIN)/ruff check operators models pipelines tests benchmarks
	$(BIN)/python -m pytest -q --durations=15 tests

bench: install
	@mkdir -p .tmp benchmarks/results
	$(BIN)/python benchmarks/operators.py
	$(BIN)/python benchmarks/simulate.py
	$(BIN)/python benchmarks/reprocess.py
	$(BIN)/python benchmarks/integrity.py
	$(BIN)/python benchmarks/preprocess.py
	$(BIN)/python benchmarks/train_overhead.py
	$(BIN)/python benchmarks/submit_overhead.py

# Learned reconstruction against tuned classical methods (about 2 hours on 2 CPU cores).
bench-learned: install
	@mkdir -p .tmp benchmarks/results
	$(BIN)/python benchmarks/brain_realism.py
	$(BIN)/python benchmarks/sample_complexity.py
	$(BIN)/python benchmarks/learned_3d.py
	$(BIN)/medrecon run pipelines/specs/recon_benchmark.yaml
	$(BIN)/medrecon run pipelines/specs/recon_benchmark_ct.yaml

# Analysis: segmentation, classification, reconstruction's effect on them, priors, uncertainty.
bench-analysis: install
	@mkdir -p .tmp benchmarks/results
	$(BIN)/medrecon run pipelines/specs/segment.yaml
	$(BIN)/medrecon run pipelines/specs/lesion_classify.yaml
	$(BIN)/medrecon run pipelines/specs/segment_after_recon.yaml
	$(BIN)/medrecon run pipelines/specs/segment_after_recon_8x.yaml
	$(BIN)/medrecon run pipelines/specs/lesion_kspace.yaml
	$(BIN)/medrecon run pipelines/specs/lesion_kspace.yaml --set stages.1.mask.acceleration=8 \
	  --set archive.path=runs/lesion_kspace_8x/archive --set tracking.uri=sqlite:///runs/lesion_kspace_8x/mlflow.db
	$(BIN)/python benchmarks/augmentation.py
	$(BIN)/python benchmarks/gan_prior.py
	$(BIN)/python benchmarks/srcnn.py
	$(BIN)/medrecon run pipelines/specs/superres.yaml
	$(BIN)/python benchmarks/uncertainty.py

lint: install
	$(BIN)/ruff check operators models pipelines tests benchmarks

clean:
	rm -rf .tmp runs mlruns benchmarks/results
