"""What this node can offer for layers: free memory and a measured speed."""

from __future__ import annotations

import time
from pathlib import Path

RESERVE_BYTES = 512 << 20  # left for the OS and meshd itself when no budget is configured


def free_memory_bytes() -> int:
    """MemAvailable less a reserve (0 if unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return max(0, int(line.split()[1]) * 1024 - RESERVE_BYTES)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def measure_speed_gbs(seconds: float = 0.1) -> float:
    """Matrix-vector throughput in GB/s of weights read (float32, 64 MiB matrix: beyond CPU caches).

    Decoding one token streams every weight once, so it is bound by this, not
    by peak FLOPs; the planner compares nodes by it. Blocking (~0.1 s).
    """
    import numpy as np

    matrix = np.full((4096, 4096), 0.5, dtype=np.float32)  # the values do not matter, only the bytes read
    vector = np.full(4096, 0.25, dtype=np.float32)
    matrix @ vector  # warm up
    runs, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        matrix @ vector
        runs += 1
    return runs * matrix.nbytes / elapsed / 1e9 if runs else 0.0
