#!/usr/bin/env bash
# Issue 22's finished study into the repository, in one step: the study's report and plots (the pipeline wrote
# them to WORK/docs/ablation, with results_5_seeds.md and the p_train = 0 study's report in p_train_0/; results.md
# is then rewritten from the same cells by this checkout's report code, which may have more tables), the cell
# records they were computed from (per-problem test results included, so every figure recomputes from the
# repository), the pipeline's choices, the p_train = 0 comparison (scripts/training_with_dropout.py) and the
# HParams screenshot of the study's test runs (scripts/study_hparams_screenshot.sh; needs chromium).
#
#   scripts/paper_finish.sh [WORK] [OUT]      (defaults: /work/runs/paper, docs/results/ablation)
#
# The README's summary of the study is written by hand from OUT/results.md.
set -euo pipefail
WORK=${1:-/work/runs/paper}
OUT=${2:-docs/results/ablation}
[ -f "$WORK/docs/ablation/results.md" ] || { echo "no study report in $WORK/docs/ablation: the study has not run to its end" >&2; exit 1; }
grep -q '"study_final"' "$WORK/docs/paper_setting/choices.json" \
  || echo "warning: choices.json has no study_final: the pipeline has not finished its extend step" >&2
mkdir -p "$OUT/cells"
cp -r "$WORK/docs/ablation/." "$OUT/"
cp "$WORK"/study/cells/*.json "$OUT/cells/"
if ls "$WORK"/pt0/cells/*.json >/dev/null 2>&1; then
  mkdir -p "$OUT/p_train_0/cells"
  cp "$WORK"/pt0/cells/*.json "$OUT/p_train_0/cells/"
fi
cp "$WORK/docs/paper_setting/choices.json" "$OUT/choices.json"
# results.md again from the same cells with this checkout's report (the driver's commit may predate a table, e.g.
# the answers changed against the start); the driver's own stays as results_<N>_seeds.md for the first N seeds
SEEDS=$(python -c "import json, sys; c = json.load(open(sys.argv[1])); print(c.get('study_final', c.get('study_5', {})).get('seeds', 0))" \
  "$WORK/docs/paper_setting/choices.json")
if [ "$SEEDS" -gt 0 ]; then
  python scripts/study_so_far.py --work "$WORK" --seeds "$SEEDS" --out "$OUT"
else
  echo "warning: no finished study in choices.json; results.md is the driver's" >&2
fi
python scripts/training_with_dropout.py --work "$WORK" --out "$OUT"
# seed 0's start was built and tested by the p_train grid: its test run lives there
P=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['p_train']['chosen'])" "$WORK/docs/paper_setting/choices.json")
EXTRA=()
[ -e "$WORK/study/tb/test_coconut/seed0" ] || EXTRA=("$WORK/p_train/pt$P/tb/test_coconut/seed0")
scripts/study_hparams_screenshot.sh "$WORK/study/tb" "${HPARAMS_PNG:-docs/images/hparams.png}" "${EXTRA[@]}"
echo "written: $OUT (and the screenshot); now the README's summary"
