#!/usr/bin/env bash
# Issue 20's remaining step, in one command for a machine with a GPU (CPU-hours here, minutes
# there): the shipped toy-wan's VAE fine-tuned on 129-frame clips (the colour it loses beyond
# ~20 frames caps every method's colour at length), gated on its reconstructions, then the
# transformer fine-tuned on the new latents, exported to OUT/export, and the 8x quality rows
# (the VAE ceiling, exact, clip_parallel) read back through a real coordinator on that folder.
#   bench/retrain_toy_wan.sh [OUT]        (default /tmp/toy-wan-retrain)
# Sizes from the environment (a smoke run: VAE_STEPS=2 CLIPS=16 TRANSFORMER_STEPS=2 PROMPTS=1).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-/tmp/toy-wan-retrain}
VAE_STEPS=${VAE_STEPS:-1000} CLIPS=${CLIPS:-3072} TRANSFORMER_STEPS=${TRANSFORMER_STEPS:-1500} PROMPTS=${PROMPTS:-16}
SHIPPED=shared/models/toy-wan
"$PY" -m clipmesh.toytrain --out "$OUT" --phase vae --vae-from "$SHIPPED/vae" \
    --vae-stages "${VAE_STEPS}x129x1x1.5e-4"
"$PY" -m clipmesh.toytrain --out "$OUT" --phase vae-check
"$PY" -m clipmesh.toytrain --out "$OUT" --phase latents --clips "$CLIPS"
"$PY" -m clipmesh.toytrain --out "$OUT" --phase transformer --transformer-from "$SHIPPED/transformer" \
    --transformer-steps "$TRANSFORMER_STEPS" --transformer-lr 5e-4
"$PY" -m clipmesh.toytrain --out "$OUT" --phase export --export "$OUT/export"
"$PY" -m bench.quality --model "$OUT/export" --lengths 1,8 --seeds 1 --prompts "$PROMPTS" \
    --methods 'VAE ceiling,exact,clip_parallel' --output "$OUT/quality.md" --strip ''
echo "the retrained toy-wan: $OUT/export; its quality rows: $OUT/quality.md (ship it with: cp -r $OUT/export/* $SHIPPED/)"
