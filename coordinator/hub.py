"""Progress fan-out: wakes every WatchJob of a job when its events change.

The store is the source of truth for events; the hub only says "look again",
so a watcher that falls behind never loses an event. A job has a condition only while
someone waits on it: a notify with no waiter wakes no one (as a Condition's would), so the
hub holds the jobs being watched, not every job it has seen.
"""

from __future__ import annotations

import asyncio


class ProgressHub:
    def __init__(self) -> None:
        self._conditions: dict[str, asyncio.Condition] = {}
        self._waiters: dict[str, int] = {}

    def __len__(self) -> int:
        """Jobs with a watcher waiting now."""
        return len(self._conditions)

    async def notify(self, job_id: str) -> None:
        cond = self._conditions.get(job_id)
        if cond is None:
            return
        async with cond:
            cond.notify_all()

    async def wait(self, job_id: str, timeout: float) -> None:
        """Returns on the next notify for the job, or after `timeout` seconds."""
        cond = self._conditions.setdefault(job_id, asyncio.Condition())
        self._waiters[job_id] = self._waiters.get(job_id, 0) + 1
        try:
            async with cond:
                try:
                    await asyncio.wait_for(cond.wait(), timeout)
                except TimeoutError:
                    pass
        finally:
            self._waiters[job_id] -= 1
            if not self._waiters[job_id]:
                del self._waiters[job_id], self._conditions[job_id]
