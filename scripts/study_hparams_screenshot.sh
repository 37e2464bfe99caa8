#!/usr/bin/env bash
# The HParams tab of a study's test runs only: one row per arm and seed with its test pass@1.
#
#   scripts/study_hparams_screenshot.sh STUDY_TB [OUT.png [RUN_DIR ...]]      (default OUT: docs/images/hparams.png)
#
# Each RUN_DIR (.../test_<arm>/<version>/, from another log root) is added as test_<arm>/<version>: issue 22's seed-0
# start was built and tested by the p_train grid, so its test run lives under p_train/pt<p>/tb, not the study's.
#
# A study's TensorBoard root (its --work's tb/, e.g. /work/runs/paper/study/tb) also holds its starts, their
# checks and the arms' training runs, which a screenshot would list first. This copies each test run's settings
# and event file (not its predictions) to a temporary log root, writes the experiment description there
# (python -m lightning_latent.experiments.hparams) and takes the screenshot (scripts/hparams_screenshot.sh).
set -euo pipefail
TB=${1:?usage: $0 STUDY_TB [OUT.png [RUN_DIR ...]]}
OUT=${2:-docs/images/hparams.png}
shift $(($# < 2 ? $# : 2))
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
n=0
copy_run() {  # RUN_DIR REL: its event file and settings (not its predictions) to $TMP/REL
  mkdir -p "$TMP/$2"
  cp "$1"/events.out.tfevents.* "$TMP/$2"
  cp "$1"/*.yaml "$TMP/$2" 2>/dev/null || true
  n=$((n + 1))
}
for run in "$TB"/test_*/*/; do
  [ -d "$run" ] || continue
  ls "$run"/events.out.tfevents.* >/dev/null 2>&1 || continue   # a test run that has not started logging
  copy_run "$run" "${run#"$TB"/}"
done
for run in "$@"; do
  run=${run%/}
  ls "$run"/events.out.tfevents.* >/dev/null 2>&1 || { echo "no event file in $run" >&2; exit 1; }
  rel=$(basename "$(dirname "$run")")/$(basename "$run")
  [ ! -e "$TMP/$rel" ] || { echo "$rel twice (the study's and $run)" >&2; exit 1; }
  copy_run "$run" "$rel"
done
[ "$n" -gt 0 ] || { echo "no test run under $TB (test_<arm>/<version>/)" >&2; exit 1; }
echo "$n test runs"
python -m lightning_latent.experiments.hparams "$TMP"
"$(dirname "$0")/hparams_screenshot.sh" "$TMP" "$OUT"
