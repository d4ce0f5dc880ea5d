#!/usr/bin/env bash
# Regenerates the files behind RESULTS.md's P3 section, start to end: the base model (if $MMCL_HOME has none), the
# instruction-tuned base, 13 methods x 5 seeds from each base as two `compare` lanes side by side, then a second
# instance of the instruction-tuned base (instruction-tuning seed 1) with the same 39 runs as two half lanes, the
# tables and the copies under docs/results/. Completed runs are skipped, so an interrupted run resumes where it stopped.
#
#     bash docs/results/p3_rerun.sh [OUT]        # OUT defaults to runs/p3; about 2 hours on 2 idle cores
#
# Runs one torch thread per lane (two lanes on two cores). Then rewrite RESULTS.md's P3 tables from
# docs/results/p3_tables.md and its prose from what those tables show.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/p3}
BIN=.venv/bin
M="sequential,ewc,ewc[lambda_=1],tir_ewc,tir_ewc[lambda_=1],mas,mas[lambda_=1],tir_mas,tir_mas[lambda_=1],lwf,replay,eproj,eproj[expand=similarity]"
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"

BASE=$($BIN/python -c "from mmcl.builtin import builtin_model; print(builtin_model(progress=False, log=lambda *a: None))")
[ -f "$OUT/base-instruct/mmcl_model.json" ] || \
  $BIN/mmcl pretrain --no-progress --instruct image_cap,image_qa --base "$BASE" --out "$OUT/base-instruct"

export OMP_NUM_THREADS=1
$BIN/mmcl compare configs/p3/base.yaml --methods "$M" --seeds 0,1,2,3,4 --out "$OUT/pretrained" --no-progress \
  > "$OUT/pretrained.log" 2>&1 &
$BIN/mmcl compare configs/p3/base.yaml model.path="$OUT/base-instruct" --methods "$M" --seeds 0,1,2,3,4 \
  --out "$OUT/instructed" --no-progress > "$OUT/instructed.log" 2>&1 &
wait

# A second instance of the instruction-tuned base: same recipe and data, instruction-tuning seed 1. The intervals over
# stream seeds say nothing about how results move with the instance; this measures it once.
[ -f "$OUT/base-instruct-s1/mmcl_model.json" ] || \
  $BIN/mmcl pretrain --no-progress --instruct image_cap,image_qa --base "$BASE" --seed 1 --out "$OUT/base-instruct-s1"
M1="sequential,ewc,ewc[lambda_=1],tir_ewc,tir_ewc[lambda_=1],mas,mas[lambda_=1]"
M2="tir_mas,tir_mas[lambda_=1],lwf,replay,eproj,eproj[expand=similarity]"
for half in "$M1" "$M2"; do
  $BIN/mmcl compare configs/p3/base.yaml model.path="$OUT/base-instruct-s1" --methods "$half" --seeds 0,1,2 \
    --out "$OUT/instructed-s1" --no-progress >> "$OUT/instructed-s1.log" 2>&1 &
done
wait
# every run is complete now: this only writes the comparison of all 13 methods
$BIN/mmcl compare configs/p3/base.yaml model.path="$OUT/base-instruct-s1" --methods "$M" --seeds 0,1,2 \
  --out "$OUT/instructed-s1" --no-progress >> "$OUT/instructed-s1.log" 2>&1

R=docs/results
$BIN/python $R/p3_summary.py "$OUT/pretrained" "$OUT/instructed" "$OUT/instructed-s1" > $R/p3_tables.md
for kind in pretrained instructed instructed-s1; do
  sed -e "s#(accuracy_vs_forgetting.png)#(p3_${kind}_accuracy_vs_forgetting.png)#" "$OUT/$kind/comparison.md" \
    > $R/p3_${kind}_comparison.md
  cp "$OUT/$kind/comparison.json" $R/p3_${kind}_comparison.json
  cp "$OUT/$kind/accuracy_vs_forgetting.png" $R/p3_${kind}_accuracy_vs_forgetting.png
done
cp "$OUT/pretrained/tir_ewc/seed-0/plots/similarity.png" $R/p3_similarity.png
cp "$BASE/pretrain.json" $R/p3_base.json
cp "$OUT/base-instruct/pretrain.json" $R/p3_instructed_base.json
cp "$OUT/base-instruct-s1/pretrain.json" $R/p3_instructed-s1_base.json
HOME_DIR=$($BIN/python -c "from mmcl.builtin import mmcl_home; print(mmcl_home().resolve())")
OUT_DIR=$(cd "$OUT" && pwd)  # an OUT outside the repository reads as the documented runs/p3
sed -i "s|$OUT_DIR/|runs/p3/|g; s|$PWD/||g; s|$HOME_DIR/|\$MMCL_HOME/|g" $R/p3_*.md $R/p3_*.json
echo "P3 files written under $R; now update RESULTS.md's P3 section from $R/p3_tables.md"
