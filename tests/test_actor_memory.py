"""The actors hand freed heap back to the OS after each task (glibc ``malloc_trim``), and start without what
only the driver needs."""

from __future__ import annotations

import ctypes.util
import sys
from pathlib import Path

import pytest

from actors.memory import _malloc_trim, return_freed_memory


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux") or _malloc_trim() is None, reason="glibc only")
def test_freed_heap_that_glibc_keeps_is_returned_to_the_os():
    # Interleave 64 KB blocks (what glibc serves from the heap) with small survivors, so the freed blocks
    # sit below live memory and glibc's automatic trimming of the heap top cannot reach them.
    blocks, survivors = [], []
    for _ in range(2000):
        blocks.append(bytearray(b"x" * 65536))
        survivors.append(bytearray(1024))  # above pymalloc's 512-byte limit: on the glibc heap too
    del blocks
    before = resident_bytes()
    return_freed_memory()
    assert before - resident_bytes() > 64 << 20  # most of the 125 MB freed comes back


def test_an_actor_process_starts_without_pandas():
    """Every run starts a server and client actors: pandas (about 0.4 s of import each) is the driver's."""
    import subprocess

    loaded = subprocess.run([sys.executable, "-c", "import sys, actors; print('pandas' in sys.modules)"],
                            capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    assert loaded.stdout.strip() == "False", loaded.stderr
