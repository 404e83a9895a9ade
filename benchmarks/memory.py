"""Peak resident memory of a piece of work, measured by the kernel (CPU runs; call it in a fresh process)."""

from __future__ import annotations

import gc
import resource
from collections.abc import Callable


def status_bytes(field: str) -> int:
    """A memory field of `/proc/self/status` (`VmRSS`, `VmHWM`, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current resident set; `False` where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def extra_peak_rss(work: Callable[[], object]) -> tuple[int, bool]:
    """Run `work()`; return (peak RSS during it minus the RSS right before it, whether the figure is exact).

    The kernel's peak-RSS mark (VmHWM) is reset right before the work (`echo 5 > /proc/self/clear_refs`), so it holds
    the peak of the work alone. Where the reset is not allowed, `ru_maxrss` is used, and the figure is exact only if
    the work's peak exceeded everything before it (imports, model build).
    """
    gc.collect()
    reset = reset_peak_rss()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    before = status_bytes("VmRSS")
    work()
    peak = status_bytes("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak - before, reset or peak > peak_before
