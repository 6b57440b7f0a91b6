"""Peak resident memory of this process (Linux >= 4.0), shared by the benchmarks.

``reset_peak`` resets the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``),
so that ``peak() - reset_peak()`` is what was allocated in between, not what the
imports or the data generation left behind.
"""


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak():
    """Reset the high-water mark; return the resident size now (bytes)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def peak():
    """The resident high-water mark since the last reset (bytes)."""
    return _status("VmHWM")
