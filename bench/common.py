"""Constants every benchmark shares: one place, so the scripts' rows stay comparable."""

from __future__ import annotations

import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PROMPT = "a lighthouse on a cliff at dusk, waves rolling in"
GUIDANCE = 5.0  # > 1: classifier-free guidance, two transformer calls per step (as in Wan)
SEED = 0
THREADS = 1  # torch threads per rank process, unless a script says otherwise
GROUP_TIMEOUT_S = 3600  # collectives' timeout; a dead peer is noticed by the parent long before
HOST = "127.0.0.1"  # every rank on this machine, joined over gloo on loopback
