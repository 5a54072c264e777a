"""Peak-memory bookkeeping shared by the benchmarks that measure each arm in a fresh process (Linux only)."""

from __future__ import annotations

# glibc returns freed blocks above this size to the OS at once, so VmHWM tracks tensors, not allocator slack.
MMAP_THRESHOLD_BYTES = 64 * 1024


def proc_status_bytes(field: str) -> int:
    """A ``/proc/self/status`` field (``VmRSS``, ``VmHWM``, ``VmSize``, ...) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")
