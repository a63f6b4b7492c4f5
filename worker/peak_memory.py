"""The peak memory of one unit of work, for the per-step reports (StepProgress.peak_memory_bytes).

Apart from memory.py on purpose: tests/test_memory.py probes glibc's heap right after importing
memory.py, and what that import allocates decides where its probe's blocks land."""

from __future__ import annotations


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
