"""release_free_memory hands freed heap pages back (glibc): what keeps a long stream's RSS flat.

Runs in a fresh interpreter: the heap of a process that already ran other tests has holes that
change where the allocations below land."""

import subprocess
import sys

import pytest

PROBE = r"""
import os, sys, torch
from clipmesh.worker.memory import release_free_memory

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

big = torch.ones(16 << 20, dtype=torch.uint8)
del big  # freeing a big mmapped block raises glibc's mmap threshold
middle = [torch.ones(1 << 20, dtype=torch.uint8) for _ in range(120)]  # so these come from the heap
keep = torch.ones(1 << 10, dtype=torch.uint8)  # above them: the heap cannot just shrink from the top
del middle
before = rss_mb()
if sys.argv[1] == "release":
    release_free_memory()
print(before - rss_mb())
"""


def _freed_mb(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return float(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc behaviour")
def test_freed_heap_pages_go_back_to_the_os():
    assert _freed_mb("keep") < 10          # without it the freed 120 MiB stay resident
    assert _freed_mb("release") > 100      # with it they go back
