#!/bin/bash
# The honest protocol (docs/shortcuts.md): for each training variant, leave each cxr-xl source out in
# turn (trained without it, tested on all of it; near-copies across sources go with the held-out
# source), and train on all of cxr-xl to test on all of cxr3 minus its near-copies of cxr-xl's
# train/val images. Every evaluation carries the shortcut audit. Variants are judged on their val
# splits (metrics_val.json of the leave-one-out runs), never on a test split or on cxr3.
#
# Each step is skipped when its output exists: rerun to resume (an interrupted training is deleted
# and retrained). Tables: $R/tables.md (written by python -m covid_spark.evaluation.protocol).
#
# Usage: bash scripts/generalisation.sh [RUNS_FOLDER]
#   VARIANTS  which variants (default: all of conf/variants/*.yaml, default first)
#   SOURCES   which cxr-xl sources to leave out (default: all four; none: no leave-one-out run);
#             EXTERNAL=0 skips cxr-xl -> cxr3
#   EPOCHS    training epochs per model (default: conf/xl.yaml's)
#   VAL_AUDIT=0  no shortcut audit on the val evaluations (they only choose the variant; the test and
#             held-out evaluations keep theirs)
set -euo pipefail
cd "$(dirname "$0")/.."
R=${1:-runs/generalisation}
XL=${XL:-../shared/data/cxr-xl}
CXR3=${CXR3:-../shared/data/cxr3}
PY=${PY:-.venv/bin/python}
VARIANTS=${VARIANTS:-$(ls conf/variants/*.yaml | xargs -n1 basename | sed 's/\.yaml$//' | sort | awk '$0=="default"{print; next} {rest=rest" "$0} END{print rest}')}
SOURCES=${SOURCES:-radiography2021 kermany nih hannover}
[ "$SOURCES" = none ] && SOURCES=""  # only the run on all of cxr-xl and its external test
EXTERNAL=${EXTERNAL:-1}
VAL_SET=(); [ "${VAL_AUDIT:-1}" = 0 ] && VAL_SET=(--set evaluate.audit=false)
SUBMIT=(spark-submit --master "${MASTER:-local[*]}" --properties-file conf/spark-local.conf)
mkdir -p "$R"

step() { local out=$1; shift; if [ -e "$out" ]; then echo "skip: $out"; else echo "run: $*"; "$@"; fi; }
# A variant's config: conf/xl.yaml under the variant file. Its preprocess keys (only those) name its datasets.
merged() { $PY - "$1" "$2" <<'EOF_PY'
import sys, yaml
def merge(a, b):
    return {k: merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v for k, v in (a | b).items()}
base, variant = (yaml.safe_load(open(p)) or {} for p in sys.argv[1:3])
print(yaml.safe_dump(merge(base, variant), sort_keys=True), end="")
EOF_PY
}
framing_of() { $PY -c 'import sys, yaml; pre = (yaml.safe_load(open(sys.argv[1])) or {}).get("preprocess") or {}
print("-".join(f"{k}={pre[k]}" for k in sorted(pre)) or "whole")' "$1"; }

dataset() {  # dataset FOLDER CONFIG INPUT [--holdout-source S]
  local out=$1 config=$2 input=$3; shift 3
  step "$out/_summary.json" "${SUBMIT[@]}" jobs/preprocess.py --input "$input" --output "$out" --config "$config" \
    --overwrite "$@"
}

model() {  # model DATASET MODEL_DIR CONFIG
  local data=$1 dir=$2 config=$3
  if [ ! -e "$dir/model.keras" ]; then
    rm -rf "$dir"
    "${SUBMIT[@]}" jobs/train.py --dataset "$data" --model-dir "$dir" --config "$config" ${EPOCHS:+--epochs $EPOCHS}
  fi
  step "$dir/metrics.json" "${SUBMIT[@]}" jobs/evaluate.py --dataset "$data" --model-dir "$dir" --config "$config"
  step "$dir/metrics_val.json" "${SUBMIT[@]}" jobs/evaluate.py --dataset "$data" --model-dir "$dir" --split val \
    --config "$config" "${VAL_SET[@]}"
}

for v in $VARIANTS; do
  config=$R/config-$v.yaml
  merged conf/xl.yaml "conf/variants/$v.yaml" > "$config"
  framing=$(framing_of "conf/variants/$v.yaml")
  for s in $SOURCES; do
    dataset "$R/data/$framing-without-$s" "$config" "$XL" --holdout-source "$s"
    model "$R/data/$framing-without-$s" "$R/$v/without-$s" "$config"
  done
  if [ "$EXTERNAL" = 1 ]; then
    dataset "$R/data/$framing-all" "$config" "$XL"
    dataset "$R/data/$framing-cxr3" "$config" "$CXR3"
    model "$R/data/$framing-all" "$R/$v/all" "$config"
    step "$R/$v/all/metrics_cxr3.json" "${SUBMIT[@]}" jobs/evaluate.py --dataset "$R/data/$framing-cxr3" \
      --model-dir "$R/$v/all" --split all --exclude-near-copies-of "$R/data/$framing-all" \
      --output "$R/$v/all/metrics_cxr3.json" --config "$config"
  fi
done
$PY -m covid_spark.evaluation.protocol "$R" --variants $VARIANTS --sources $SOURCES > "$R/tables.md"
echo "tables: $R/tables.md"
