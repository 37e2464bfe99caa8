#!/usr/bin/env bash
# Serve a log directory with TensorBoard and take a headless Chromium screenshot of its HParams tab.
#
#   scripts/hparams_screenshot.sh LOGDIR [OUT.png]      (default OUT: docs/images/hparams.png)
#
# Needs `tensorboard` (a project dependency) and Debian's `chromium` (apt-get install -y chromium; not
# needed by CI). Write the experiment description first for several runs (the ablation study and the
# sweep do it themselves): python -m lightning_latent.experiments.hparams LOGDIR. See docs/screenshots.md.
set -euo pipefail
LOGDIR=${1:?usage: $0 LOGDIR [OUT.png]}
OUT=${2:-docs/images/hparams.png}
PORT=${PORT:-6123}
WIDTH=${WIDTH:-1700}
HEIGHT=${HEIGHT:-900}
CHROMIUM=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
[ -n "$CHROMIUM" ] || { echo "chromium not found: apt-get install -y chromium" >&2; exit 1; }

tensorboard --logdir "$LOGDIR" --port "$PORT" --host 127.0.0.1 >/tmp/hparams_screenshot_tb.log 2>&1 &
TB=$!
trap 'kill $TB 2>/dev/null || true' EXIT
for _ in $(seq 60); do
  curl -sf "http://127.0.0.1:$PORT/data/plugins_listing" >/dev/null && break
  sleep 1
done
sleep 3  # let TensorBoard load the event files
mkdir -p "$(dirname "$OUT")"
"$CHROMIUM" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="$WIDTH,$HEIGHT" \
  --virtual-time-budget=20000 --screenshot="$OUT" "http://127.0.0.1:$PORT/#hparams" 2>/dev/null
echo "screenshot: $OUT"
