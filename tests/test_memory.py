"""release_free_memory hands freed heap pages back (glibc): what keeps a long stream's RSS flat."""

import os
import sys

import pytest
import torch

from clipmesh.worker.memory import release_free_memory


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc behaviour")
def test_freed_heap_pages_go_back_to_the_os():
    big = torch.ones(16 << 20, dtype=torch.uint8)
    del big  # freeing a big mmapped block raises glibc's mmap threshold
    middle = [torch.ones(1 << 20, dtype=torch.uint8) for _ in range(120)]  # now from the heap
    keep = torch.ones(1 << 10, dtype=torch.uint8)  # above them: the heap cannot just shrink from the top
    del middle
    before = _rss_mb()
    release_free_memory()
    after = _rss_mb()
    assert before - after > 60, f"the freed 120 MiB stayed resident: {before:.0f} -> {after:.0f} MiB"
    del keep
