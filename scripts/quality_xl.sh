#!/bin/bash
# Every run behind docs/results.md, "Model quality on cxr-xl and across collections", in order.
# About 2 h 40 min on a 2-core machine (its make bench: compact about 100 images/s for one rank).
# Each step is skipped when its output exists, so the script resumes after an interruption
# (an interrupted training resumes with make train ... RESUME=1, or delete its folder).
# Usage: bash scripts/quality_xl.sh [RUNS_FOLDER]   (default runs/quality)
set -euo pipefail
cd "$(dirname "$0")/.."
R=${1:-runs/quality}
XL=../shared/data/cxr-xl
CXR3=../shared/data/cxr3
mkdir -p "$R"
step() { local out=$1; shift; if [ -e "$out" ]; then echo "skip: $out exists"; else echo "run: $*"; "$@"; fi; }

# Datasets: cxr-xl and cxr3 alone (patient-wise splits, seed 42).
step $R/xl/_summary.json make preprocess DATA=$XL OUT=$R/xl
step $R/cxr3/_summary.json make preprocess DATA=$CXR3 OUT=$R/cxr3
# 1-2. The default model (conf/xl.yaml: EfficientNet-Lite0, 5 epochs) and the original CNN with the same
# time budget: 33 epochs of about 46 s fill the default's 1,539 s of training on this machine.
step $R/effnet/model.keras make train DATASET=$R/xl MODEL_DIR=$R/effnet CONFIG=conf/xl.yaml
step $R/original/model.keras make train DATASET=$R/xl MODEL_DIR=$R/original MODEL=original EPOCHS=33 CONFIG=conf/xl.yaml
for m in effnet original; do
  step $R/$m/metrics.json make evaluate DATASET=$R/xl MODEL_DIR=$R/$m
  step $R/$m/metrics_val.json make evaluate DATASET=$R/xl MODEL_DIR=$R/$m SPLIT=val
  # 3. Across collections: every cxr3 image that is not a near-copy of a cxr-xl train/val image.
  step $R/$m/metrics_cxr3.json make evaluate DATASET=$R/cxr3 MODEL_DIR=$R/$m SPLIT=all EXCLUDE=$R/xl OUT=$R/$m/metrics_cxr3.json
done
# 3. The cxr3 model (make demo) on every cxr-xl image that is not a near-copy of a cxr3 train/val image.
step runs/quality-cxr3/metrics.json make demo RUN_ID=quality-cxr3
step runs/quality-cxr3/metrics_xl.json make evaluate DATASET=$R/xl MODEL_DIR=runs/quality-cxr3 SPLIT=all \
  EXCLUDE=runs/quality-cxr3/dataset OUT=runs/quality-cxr3/metrics_xl.json
# 3. Leave-one-source-out on cxr-xl, one epoch each (cheaper): nih and hannover never seen in training.
for s in nih hannover; do
  step runs/loso-$s-quality/metrics.json make loso DATA=$XL SOURCE=$s CONFIG=conf/xl.yaml EPOCHS=1 RUN_ID=quality
done
# 4. Combined: cxr3 and cxr-xl in one run (make demo-xl with both inputs); test split per input and per source.
step runs/quality-combined/metrics.json make demo-xl RUN_ID=quality-combined DATA="$CXR3 $XL"
# The recommendation, decided on val: the combined model and the cxr-xl model on the combined val split,
# minus the near-copies of cxr-xl's train/val images (which the cxr-xl model has seen).
step $R/effnet/metrics_combined_val.json make evaluate DATASET=runs/quality-combined/dataset MODEL_DIR=$R/effnet \
  SPLIT=val EXCLUDE=$R/xl OUT=$R/effnet/metrics_combined_val.json
step runs/quality-combined/metrics_val_no_xl.json make evaluate DATASET=runs/quality-combined/dataset \
  MODEL_DIR=runs/quality-combined SPLIT=val EXCLUDE=$R/xl OUT=runs/quality-combined/metrics_val_no_xl.json
# Moonshot, judged on val only: per-image histogram equalisation (train.input_norm: equalize) against the
# same one-epoch run without it, on cxr-xl's val and on cxr3's val minus near-copies of cxr-xl train/val.
printf 'train:\n  input_norm: equalize\n' > $R/equalize.yaml
step $R/plain1/model.keras make train DATASET=$R/xl MODEL_DIR=$R/plain1 CONFIG=conf/xl.yaml EPOCHS=1
step $R/equalize1/model.keras make train DATASET=$R/xl MODEL_DIR=$R/equalize1 CONFIG=$R/equalize.yaml EPOCHS=1
for m in plain1 equalize1; do
  step $R/$m/metrics_val.json make evaluate DATASET=$R/xl MODEL_DIR=$R/$m SPLIT=val
  step $R/$m/metrics_cxr3_val.json make evaluate DATASET=$R/cxr3 MODEL_DIR=$R/$m SPLIT=val EXCLUDE=$R/xl \
    OUT=$R/$m/metrics_cxr3_val.json
done
# The tables of docs/results.md.
c() { .venv/bin/python -m covid_spark.evaluation.compare "$@"; }
c "efficientnet_lite0=$R/effnet/metrics.json" "original=$R/original/metrics.json" > $R/table-test.md
c --part patient_wise "efficientnet_lite0=$R/effnet/metrics.json" "original=$R/original/metrics.json" > $R/table-test-patients.md
c "cxr-xl → cxr3=$R/effnet/metrics_cxr3.json" "original cxr-xl → cxr3=$R/original/metrics_cxr3.json" \
  "cxr3 → cxr-xl=runs/quality-cxr3/metrics_xl.json" "LOSO nih=runs/loso-nih-quality/metrics.json" \
  "LOSO hannover=runs/loso-hannover-quality/metrics.json" > $R/table-across.md
c "combined, all=runs/quality-combined/metrics.json" > $R/table-combined.md
for part in input:cxr3 input:cxr-xl; do c --part $part "combined $part=runs/quality-combined/metrics.json"; done >> $R/table-combined.md
echo "tables: $R/table-*.md"
