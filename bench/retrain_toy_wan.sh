#!/usr/bin/env bash
# Issue 20's remaining step, in one command for a machine with a GPU (CPU-hours here, minutes
# there): the shipped toy-wan's VAE fine-tuned on 129-frame clips (the colour it loses beyond
# ~20 frames caps every method's colour at length), gated on its reconstructions, then the
# transformer fine-tuned on the new latents and then on whole 129-frame videos under
# clip_parallel's window (the middle of a long video, as clip_parallel shows it; the shipped
# transformer's last step), exported to OUT/export, and the 8x quality rows
# (the VAE ceiling, exact, clip_parallel) read back through a real coordinator on that folder.
#   bench/retrain_toy_wan.sh [OUT]        (default /tmp/toy-wan-retrain)
# Sizes from the environment (a smoke run: VAE_STEPS=2 CLIPS=16 TRANSFORMER_STEPS=2 LONG_CLIPS=16 WINDOWED_STEPS=2 PROMPTS=1).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-/tmp/toy-wan-retrain}
VAE_STEPS=${VAE_STEPS:-1000} CLIPS=${CLIPS:-3072} TRANSFORMER_STEPS=${TRANSFORMER_STEPS:-1500} PROMPTS=${PROMPTS:-16}
LONG_CLIPS=${LONG_CLIPS:-1536} WINDOWED_STEPS=${WINDOWED_STEPS:-1500}
SHIPPED=shared/models/toy-wan
"$PY" -m clipmesh.toytrain --out "$OUT" --phase vae --vae-from "$SHIPPED/vae" \
    --vae-stages "${VAE_STEPS}x129x1x1.5e-4"
"$PY" -m clipmesh.toytrain --out "$OUT" --phase vae-check
"$PY" -m clipmesh.toytrain --out "$OUT" --phase latents --clips "$CLIPS"
"$PY" -m clipmesh.toytrain --out "$OUT" --phase transformer --transformer-from "$SHIPPED/transformer" \
    --transformer-steps "$TRANSFORMER_STEPS" --transformer-lr 5e-4
# then on whole 129-frame videos under clip_parallel's window (the VAE and its latent statistics kept)
mkdir -p "$OUT/long" && rm -rf "$OUT/long/vae" && cp -r "$OUT/vae" "$OUT/long/vae"
"$PY" -m clipmesh.toytrain --out "$OUT/long" --phase latents --clips "$LONG_CLIPS" --clip-frames 129 --keep-latent-stats
"$PY" -m clipmesh.toytrain --out "$OUT/long" --phase transformer --transformer-from "$OUT/transformer" \
    --transformer-steps "$WINDOWED_STEPS" --transformer-lr 3e-4
"$PY" -m clipmesh.toytrain --out "$OUT/long" --phase export --export "$OUT/export"
"$PY" -m bench.quality --model "$OUT/export" --lengths 1,8 --seeds 1 --prompts "$PROMPTS" \
    --methods 'VAE ceiling,exact,clip_parallel' --output "$OUT/quality.md" --strip ''
echo "the retrained toy-wan: $OUT/export; its quality rows: $OUT/quality.md (ship it with: cp -r $OUT/export/* $SHIPPED/)"
