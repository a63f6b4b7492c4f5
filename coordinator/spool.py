"""An upload's bytes onto disk (frames and checkpoint parts alike)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from .errors import InvalidArgument


async def spool(chunks: AsyncIterator[bytes], path: Path, size: int, what: str) -> None:
    """Exactly `size` bytes of `chunks` into `path`; more or fewer is INVALID_ARGUMENT and the file
    is removed, so a short or padded upload never counts. Writes off the event loop."""
    received = 0
    with open(path, "wb") as f:
        async for data in chunks:
            received += len(data)
            if received > size:
                break
            await asyncio.to_thread(f.write, data)
    if received != size:
        path.unlink(missing_ok=True)
        raise InvalidArgument("data", f"expected {size} bytes of {what}, got {received}")
