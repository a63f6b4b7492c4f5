"""Per-worker savers (Streamlined Inference, docs/algorithms.md section 3), installed by the runner
after the strategy's patches and through the same Patches, so they compose with every strategy:

- slicing.py: the feature slicer with operator grouping (exact): the operators of a group run
  chunk by chunk, so the group's full-size intermediates never exist at once;
- step_cache.py: step rehash (UNet-style families) and diffusers' caches (Wan), approximate;
  every rank takes the same skip/compute decision at every step.

What to slice and what the deep path is are the adapter's data (`slice_groups`, `deep_path`).
(savers.tiled_decode is the decoder's: render.Decoder asks the adapter for a tiled stream.)
The resolved options are plan.savers (clipmesh.savers says what a request may ask for).
"""

from __future__ import annotations

from clipmesh.savers import parse_step_cache


def install_savers(job, patches) -> None:
    savers = job.plan.savers
    if savers.slice_chunks > 0:
        from clipmesh.worker.savers.slicing import install_slicing

        install_slicing(job, patches, savers.slice_chunks)
    cache = parse_step_cache(savers.step_cache, job.model.family)
    if cache.kind != "off":
        from clipmesh.worker.savers.step_cache import install_step_cache

        install_step_cache(job, patches, cache)
