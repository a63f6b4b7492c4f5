"""Keep a long-running worker's resident memory at what it uses.

Why: glibc's malloc raises its mmap threshold after big tensors are freed (up to 32 MiB), so
later tensors come from the heap, and the heap's freed pages stay resident. A stream that
runs for hours (block_pipeline) would then grow in RSS with the video's length although
nothing is alive. malloc_trim hands free pages back; it is cheap once per video block. A
fixed mmap threshold does the same per allocation but costs ~40% speed in page faults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc); a no-op elsewhere."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


class PeakMemory:
    """The peak memory of one unit of work (a step): on CUDA the allocator's peak, reset per
    unit; elsewhere the process's peak RSS within the unit (Linux: /proc/self/clear_refs "5"
    resets VmHWM to the current RSS). 0 where neither can be read."""

    def __init__(self, device):
        import torch

        self.device = torch.device(device)

    def reset(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def peak(self) -> int:
        """Bytes at the peak since reset()."""
        if self.device.type == "cuda":
            import torch

            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0
