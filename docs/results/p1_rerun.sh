#!/usr/bin/env bash
# Regenerates the files behind RESULTS.md's P1 section: the `small` model (once), P1's 8 methods x 3 seeds and the
# single-task ceilings (each train task alone per seed) as two one-thread lanes that take jobs from one ordered list,
# then the 3-seed aggregate and the copies under docs/results/. A lane claims a job by creating its directory under
# OUT/.claims (mkdir is atomic); mmcl skips completed runs and resumes an interrupted one from its last checkpoint, so
# the script can simply be started again after an interruption.
#
#     bash docs/results/p1_rerun.sh [OUT]        # OUT defaults to runs/p1; about 5 hours on 2 idle cores
#                                                # (a run takes 18-42 min on one core of a 2-core Intel Xeon)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/p1}
BIN=.venv/bin
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
$BIN/mmcl models prepare small
METHODS=(sequential "lora[mode=merge]" ia3 "soft_targets[average=all]" "lora[mode=merge]+soft_targets[average=all]"
         "lora[mode=merge]+soft_targets[average=all]+rehearsal" freeze_last_block rehearsal)
JOBS=()
for s in 0 1 2; do JOBS+=("$s|SINGLE"); for m in "${METHODS[@]}"; do JOBS+=("$s|$m"); done; done
rm -rf "$OUT/.claims"; mkdir -p "$OUT/.claims"

lane() {
  for j in "${JOBS[@]}"; do
    local s=${j%%|*} m=${j#*|}
    mkdir "$OUT/.claims/$(echo "$j" | tr -c 'A-Za-z0-9\n' '_')" 2>/dev/null || continue
    if [ "$m" = SINGLE ]; then
      $BIN/mmcl single-task configs/p1/base.yaml --seeds "$s" --out "$OUT/single_task" --no-progress
    else
      $BIN/mmcl compare configs/p1/base.yaml --seeds "$s" --out "$OUT" --methods "$m" --no-progress
    fi
  done
}
lane >> "$OUT.lane-a.log" 2>&1 &
lane >> "$OUT.lane-b.log" 2>&1 &
wait
ALL=$(IFS=,; echo "${METHODS[*]}")
$BIN/mmcl compare configs/p1/base.yaml --seeds 0,1,2 --single-task --out "$OUT" --methods "$ALL" --no-progress
R=docs/results
sed -e "s#$OUT/#runs/p1/#g" -e "s#(accuracy_vs_forgetting.png)#(p1_accuracy_vs_forgetting.png)#" "$OUT/comparison.md" \
  > $R/p1_comparison.md
cp "$OUT/accuracy_vs_forgetting.png" $R/p1_accuracy_vs_forgetting.png
cp "$OUT/single_task/single_task.json" $R/p1_single_task.json
sed -e "s#$OUT/#runs/p1/#g" "$OUT/comparison.json" > $R/p1_comparison.json
$BIN/python $R/p1_language_rows.py "$OUT" > $R/p1_language_rows.md
echo "P1 files written under $R; now update RESULTS.md's P1 section from them"
