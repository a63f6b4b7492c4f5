"""Strategy implementations, one module each, found by the name in the strategy spec table
(clipmesh.specs, the one registry of strategy names): `clipmesh.worker.strategies.<name>`
defines STRATEGY, the class."""

from __future__ import annotations

import importlib

from clipmesh.specs import DEFAULT_STRATEGY, STRATEGY_SPECS
from clipmesh.worker.strategies.base import Strategy


def get_strategy(name: str) -> Strategy:
    """A fresh strategy instance for one job ("" means the spec table's default)."""
    name = name or DEFAULT_STRATEGY
    if name not in STRATEGY_SPECS:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGY_SPECS)}")
    return importlib.import_module(f"{__name__}.{name}").STRATEGY()
