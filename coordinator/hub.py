"""Progress fan-out: wakes every WatchJob of a job when its events change.

The store is the source of truth for events; the hub only says "look again",
so a watcher that falls behind never loses an event.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict


class ProgressHub:
    def __init__(self) -> None:
        self._conditions: dict[str, asyncio.Condition] = defaultdict(asyncio.Condition)

    async def notify(self, job_id: str) -> None:
        cond = self._conditions[job_id]
        async with cond:
            cond.notify_all()

    async def wait(self, job_id: str, timeout: float) -> None:
        """Returns on the next notify for the job, or after `timeout` seconds."""
        cond = self._conditions[job_id]
        async with cond:
            try:
                await asyncio.wait_for(cond.wait(), timeout)
            except TimeoutError:
                pass
