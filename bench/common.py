"""What every benchmark row shares: the environment (git sha, versions, host), clocks with device sync only at stage
boundaries, peak memory, and latency percentiles."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent


def parse_generation_sets(items: Sequence[str]) -> dict[str, Any]:
    """['temperature=1.5', 'cfg=[3,1]'] -> generation overrides, checked (and typed) by GenerationConfig."""
    from magnet_engine.engine.config import GenerationConfig
    from magnet_engine.train.common import parse_sets as key_values

    pairs = key_values(items)
    cfg = GenerationConfig.from_dict(pairs)  # unknown keys and bad values fail here, with the dataclass's message
    return {k: getattr(cfg, k) for k in pairs}


def git_sha() -> str:
    """The checkout's HEAD (with `+dirty` when tracked files differ), or 'unknown' outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=REPO, capture_output=True,
                               timeout=10).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Installed versions (None = not installed); read from package metadata so nothing heavy gets imported."""
    return {"torch": torch.__version__, "triton": _version("triton"), "onnxruntime": _version("onnxruntime"),
            "transformers": _version("transformers"), "python": platform.python_version()}


def cpu_model() -> str:
    """`lscpu`'s model name (falls back to /proc/cpuinfo, then platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host() -> dict[str, object]:
    """CPU model, cores, torch threads, GPU name (None = no GPU), and the 1-minute load average: on a shared machine
    a load above the core count means the timings include waiting for other processes."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    return {"cpu": cpu_model(), "cores": os.cpu_count() or 0, "threads": torch.get_num_threads(), "gpu": gpu,
            "load_avg_1m": load}


def sync(device: torch.device) -> None:
    """Wait for queued device work; called only at stage boundaries so the clocks see finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageClock:
    """Accumulates wall-clock seconds per named stage: `with clock("lm"): ...` syncs the device on entry and exit."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        sync(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0


def reset_peak_memory(device: torch.device) -> None:
    """CUDA: reset the allocator's max. CPU: reset the kernel's RSS high-water mark (Linux clear_refs '5'),
    so the peak belongs to this scenario; where that is not allowed the peak is the process's lifetime peak."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated by torch's allocator. CPU: peak resident set size of this process (weights included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100] (numpy's default method, without numpy)."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of no values")
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(values: Sequence[float]) -> dict[str, float]:
    """-> {median, p20, p80, min, max} in the values' unit."""
    return {"median": statistics.median(values), "p20": percentile(values, 20), "p80": percentile(values, 80),
            "min": min(values), "max": max(values)}


def report_capture_failures(bench: str, failures: Sequence[str]) -> int:
    """A benchmark's exit status: 1 (and every reason on stderr) when some program or pass layout failed to capture
    and ran eagerly instead, so a graphed stage never reports timings of something else as its own (gpu.sh)."""
    for reason in dict.fromkeys(failures):
        print(f"bench {bench}: a CUDA graph capture failed, the run was eager there: {reason}", file=sys.stderr)
    return 1 if failures else 0
