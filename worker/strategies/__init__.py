"""Strategy registry: the names a RenderPlan's `strategy` may take."""

from __future__ import annotations

from clipmesh.worker.strategies.base import Strategy
from clipmesh.worker.strategies.block_pipeline import BlockPipelineStrategy
from clipmesh.worker.strategies.clip_parallel import ClipParallelStrategy
from clipmesh.worker.strategies.exact import ExactStrategy

STRATEGIES: dict[str, type[Strategy]] = {"exact": ExactStrategy, "clip_parallel": ClipParallelStrategy,
                                     "block_pipeline": BlockPipelineStrategy}


def get_strategy(name: str) -> Strategy:
    """A fresh strategy instance for one job ("" means the default, exact)."""
    try:
        return STRATEGIES[name or "exact"]()
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}") from None
