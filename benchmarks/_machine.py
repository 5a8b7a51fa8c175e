"""What the benchmarks share: the machine line they print and the peak-memory probe.

Peak memory is the kernel's RSS high-water mark (``VmHWM``), reset through
``/proc/self/clear_refs`` right before the measured call, so the figure is the call's own.
"""
from __future__ import annotations

import os
import platform
import resource
from typing import Optional

import torch


def status_kb(field: str) -> Optional[int]:
    """``VmRSS`` / ``VmHWM`` of this process in KiB (Linux), else ``None``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (``VmHWM``) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_kb(hwm_reset: bool) -> int:
    """The high-water mark since :func:`reset_peak_rss` (else the process's ``ru_maxrss``)."""
    if hwm_reset:
        hwm = status_kb("VmHWM")
        if hwm is not None:
            return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def device_line(device: torch.device) -> str:
    """``device cuda:0 (NVIDIA H200), torch 2.x, threads N``: the first line of a device benchmark."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return f"device {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}"


def machine_line() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"torch.get_num_threads()={torch.get_num_threads()}, nproc={os.cpu_count()}, CPU: {cpu}"
    )
