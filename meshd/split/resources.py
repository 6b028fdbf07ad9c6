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
    """Matrix-vector throughput in GB/s of weights read (float32, 16 MiB matrix).

    Decoding one token streams every weight once, so it is bound by this, not
    by peak FLOPs; the planner compares nodes by it. Blocking (~0.1 s).
    """
    import numpy as np

    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((2048, 2048), dtype=np.float32)
    vector = rng.standard_normal(2048, dtype=np.float32)
    matrix @ vector  # warm up
    runs, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        matrix @ vector
        runs += 1
    return runs * matrix.nbytes / elapsed / 1e9 if runs else 0.0
