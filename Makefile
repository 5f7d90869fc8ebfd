# Two commands a newcomer types: `make demo` and `make test`. Both set up .venv first (idempotent).
# STACK=current runs any target on the second stack instead (docs/stacks.md): .venv-current,
# Python 3.12, requirements-current.txt, no Horovod (training with train.engine tf-distribute).
SHELL := /bin/bash
STACK ?= pinned
ifeq ($(STACK),current)
VENV := $(abspath .venv-current)
export TF_USE_LEGACY_KERAS := 1
else ifeq ($(STACK),pinned)
VENV := $(abspath .venv)
else
$(error STACK must be pinned or current, found '$(STACK)')
endif
PY := $(VENV)/bin/python
DATA ?= ../shared/data/cxr3
# DATA may name several inputs, separated by spaces: each becomes one --input.
INPUTS = $(foreach d,$(DATA),--input $(d))
RUN_ID ?= demo-$(shell date +%Y%m%d-%H%M%S)
MASTER ?= local[*]
PYTEST_ARGS ?=

export PATH := $(VENV)/bin:$(PATH)
export PYSPARK_PYTHON := $(PY)
export PYSPARK_DRIVER_PYTHON := $(PY)
export PYTHONWARNINGS := ignore::FutureWarning,ignore::DeprecationWarning
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: setup demo demo-xl preprocess train evaluate predict loso generalisation cv test test-fast test-docker bench bench-demo bench-xl bench-100k cluster-up cluster-down clean

setup:
	@STACK=$(STACK) VENV=$(VENV) bash scripts/setup_env.sh

# TRACKING=local (or an MLflow tracking URI, e.g. http://127.0.0.1:5000) logs the run to MLflow:
# tracking.mlflow_uri (docs/tracking-and-serving.md).
TRACKING_SET = $(if $(TRACKING),--set tracking.mlflow_uri=$(TRACKING))

demo: setup
	spark-submit --master '$(MASTER)' --properties-file conf/spark-local.conf \
	  jobs/pipeline.py $(INPUTS) --run-dir runs/$(RUN_ID) --config conf/demo.yaml \
	  $(if $(MODEL),--model $(MODEL)) $(if $(VIEWS),--views $(VIEWS)) $(if $(ENGINE),--engine $(ENGINE)) $(TRACKING_SET)

# The same pipeline on cxr-xl (17,445 images): conf/xl.yaml. DATA given on the
# command line replaces cxr-xl, e.g. cxr3 and cxr-xl together: make demo-xl DATA="../shared/data/cxr3 ../shared/data/cxr-xl"
XL_INPUTS = $(if $(filter command line,$(origin DATA)),$(INPUTS),--input ../shared/data/cxr-xl)
demo-xl: setup
	spark-submit --master '$(MASTER)' --properties-file conf/spark-local.conf \
	  jobs/pipeline.py $(XL_INPUTS) --run-dir runs/$(subst demo-,xl-,$(RUN_ID)) --config conf/xl.yaml \
	  $(if $(MODEL),--model $(MODEL)) $(if $(EPOCHS),--epochs $(EPOCHS)) $(TRACKING_SET)

# One stage at a time, under .venv (docs/jobs.md, "make shortcuts"):
#   make preprocess DATA="dir [dir ...]" OUT=runs/<name>/dataset
#   make train DATASET=runs/<name>/dataset MODEL_DIR=runs/<name>/model [MODEL=compact] [EPOCHS=1] [ENGINE=tf-distribute]
#   make predict DATA="dir [dir ...]" MODEL_DIR=runs/<name>/model OUT=runs/<name>/predictions.parquet
# An existing OUT / MODEL_DIR is refused, as by every job; OVERWRITE=1 passes --overwrite to replace it.
# MEASURE=1 runs the job under python -m bench.treemem (wall time and peak memory of its process tree).
SPARK_SUBMIT = $(if $(MEASURE),$(PY) -m bench.treemem) spark-submit --master '$(MASTER)' --properties-file conf/spark-local.conf
preprocess: setup
	@test -n "$(OUT)" || { echo "make preprocess: set OUT=runs/<name>/dataset"; exit 2; }
	$(SPARK_SUBMIT) jobs/preprocess.py $(INPUTS) --output $(OUT) $(if $(VIEWS),--views $(VIEWS)) $(if $(OVERWRITE),--overwrite)

train: setup
	@test -n "$(DATASET)" -a -n "$(MODEL_DIR)" || { echo "make train: set DATASET=… and MODEL_DIR=…"; exit 2; }
	$(SPARK_SUBMIT) jobs/train.py --dataset $(DATASET) --model-dir $(MODEL_DIR) \
	  $(if $(CONFIG),--config $(CONFIG)) $(if $(MODEL),--model $(MODEL)) $(if $(EPOCHS),--epochs $(EPOCHS)) \
	  $(if $(ENGINE),--engine $(ENGINE)) $(if $(OVERWRITE),--overwrite)

# make evaluate DATASET=… MODEL_DIR=… [SPLIT=test|val|all] [EXCLUDE=<dataset>] [OUT=<metrics file>] [OVERWRITE=1]
# EXCLUDE drops the near-copies of that dataset's train and val images (scoring a model on another collection).
evaluate: setup
	@test -n "$(DATASET)" -a -n "$(MODEL_DIR)" || { echo "make evaluate: set DATASET=… and MODEL_DIR=…"; exit 2; }
	$(SPARK_SUBMIT) jobs/evaluate.py --dataset $(DATASET) --model-dir $(MODEL_DIR) $(if $(CONFIG),--config $(CONFIG)) \
	  $(if $(SPLIT),--split $(SPLIT)) $(if $(EXCLUDE),--exclude-near-copies-of $(EXCLUDE)) $(if $(OUT),--output $(OUT)) \
	  $(if $(OVERWRITE),--overwrite)

predict: setup
	@test -n "$(MODEL_DIR)" -a -n "$(OUT)" || { echo "make predict: set MODEL_DIR=… and OUT=….csv|.parquet"; exit 2; }
	$(SPARK_SUBMIT) jobs/predict.py $(INPUTS) --model-dir $(MODEL_DIR) --output $(OUT) $(if $(VIEWS),--views $(VIEWS)) $(if $(OVERWRITE),--overwrite)

# Leave-one-source-out shortcut check: train without SOURCE, test on all of SOURCE.
# On cxr-xl: make loso DATA=../shared/data/cxr-xl SOURCE=nih CONFIG=conf/xl.yaml EPOCHS=1
SOURCE ?= kaggle3way
loso: setup
	spark-submit --master '$(MASTER)' --properties-file conf/spark-local.conf \
	  jobs/pipeline.py $(INPUTS) --run-dir runs/loso-$(SOURCE)-$(RUN_ID) --config $(or $(CONFIG),conf/demo.yaml) \
	  --holdout-source $(SOURCE) $(if $(MODEL),--model $(MODEL)) $(if $(EPOCHS),--epochs $(EPOCHS)) $(TRACKING_SET)

# The honest protocol (docs/shortcuts.md): every variant of conf/variants/ left out one cxr-xl source at a
# time, and trained on cxr-xl to be tested on cxr3; resumable; tables in runs/generalisation/tables.md.
# Narrower: make generalisation VARIANTS="default lungcrop" SOURCES=nih EPOCHS=1 EXTERNAL=0 (SOURCES=none: only
# the runs on all of cxr-xl and their external test)
generalisation: setup
	PY=$(PY) bash scripts/generalisation.sh $(or $(R),runs/generalisation)

# Patient-grouped 5-fold cross-validation over train + val of a preprocessed dataset (the test split is
# never read), to choose a model: make cv DATASET=runs/<run>/dataset [MODEL=compact] [TRANSFORM=equalize]
# [COMPARE=runs/cv-….json] [OVERWRITE=1]. Writes runs/cv-<model>[-<transform>].json (jobs/crossval.py: one
# process, no Spark); an existing one is refused unless OVERWRITE=1.
cv: setup
	@test -n "$(DATASET)" || { echo "make cv: set DATASET=runs/<run>/dataset (written by make demo)"; exit 2; }
	$(PY) jobs/crossval.py --dataset $(DATASET) --config conf/demo.yaml $(if $(MODEL),--model $(MODEL)) \
	  $(if $(TRANSFORM),--transform $(TRANSFORM)) $(if $(COMPARE),--compare $(COMPARE)) \
	  --output runs/cv-$(or $(MODEL),default)$(if $(TRANSFORM),-$(TRANSFORM)).json $(if $(OVERWRITE),--overwrite)

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

# The Docker image of STACK built and the compose cluster (docker/docker-compose.yml) run on a small sample,
# outputs checked, everything taken down (docker/README.md). DOCKER_STACKS="pinned current" does both stacks.
# Installs and starts Docker where missing (root); prints SKIPPED where Docker cannot run. No venv needed.
test-docker:
	DOCKER_STACKS="$(or $(DOCKER_STACKS),$(STACK))" bash scripts/test_docker.sh

# Throughput benchmarks (not part of `make test`), one entry point (python -m bench.run): bench/results.json + tables.
# BENCH_ARGS e.g. --quick, --sizes all,10000, --models compact, --parts preprocess. See docs/performance.md.
BENCH_ARGS ?=
bench: setup
	$(PY) -m bench.run --input $(DATA) $(BENCH_ARGS)

# `make demo` timed stage by stage, beside the original's 48 minutes of training.
bench-demo: setup
	$(PY) -m bench.demo

# The same on real data at scale (../shared/data/cxr-xl, 17,445 images): preprocess at
# 671-50,000 images with peak memory, duplicate grouping, predict, training rates and one epoch per model
# → bench/results-xl.json + tables. BENCH_XL_ARGS e.g. --quick, --skip-epoch, --models compact, --parts predict.
BENCH_XL_ARGS ?=
bench-xl: setup
	$(PY) -m bench.run --xl $(BENCH_XL_ARGS)

# 100,000 images made from cxr-xl (python -m bench.expand: crops, rotations and intensity changes of each image,
# written once to SCALE_DATA, outside the repository), then preprocess, a one-epoch training and predict at
# 17,445 and 100,000 images in one run → bench/results-scale.json + tables (docs/performance.md, "100,000 images").
# BENCH_SCALE_ARGS e.g. --sizes 17445,35000, --cluster (a 2-worker standalone cluster), --model efficientnet_lite0.
SCALE_DATA ?= /tmp/covid-spark-cxr-100k
BENCH_SCALE_ARGS ?=
bench-100k: setup
	test -f $(SCALE_DATA)/manifest.csv || $(PY) -m bench.expand --output $(SCALE_DATA) --count 100000
	$(PY) -m bench.scale --data $(SCALE_DATA) $(BENCH_SCALE_ARGS)

cluster-up: setup
	@bash scripts/cluster.sh up

cluster-down:
	@bash scripts/cluster.sh down

clean:
	rm -rf runs/ spark-warehouse/ .pytest_cache/ build/ dist/ *.egg-info
