"""What one caller may cost the coordinator: one message, one stream, one job, the queue.

Beyond a limit the call is refused (RESOURCE_EXHAUSTED, or INVALID_ARGUMENT naming the field)
and nothing accepted before is lost. Request fields have theirs in validate.py.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 4 << 20    # one gRPC message either way (videos and uploads go in 1 MiB chunks)
    max_queued_jobs: int = 10_000       # SubmitJob beyond: RESOURCE_EXHAUSTED
    max_watchers_per_job: int = 64      # WatchJob streams of one job at once
    register_timeout_s: float = 10.0    # an Attach stream that has not registered by then is closed
    retention_s: float = 7 * 86400.0    # a finished job (video, events, row) is deleted this long after (0: kept)
    # an unbounded job's upload may start at most this many of the plan's decode turns (world
    # size x DECODE_RUN blocks) past the video's end: nothing far ahead is held on disk
    turns_ahead: int = 8
