"""What every benchmark shares: the machine's description, best-of-n timing, and running one measurement in a fresh
process so that its peak RSS is its own (`ru_maxrss` never goes down, so earlier runs in one process would mask it).

A measurement is a function `module.name(**kwargs) -> dict`; `measure_in_subprocess` runs it as
`python -m benchmarks.common module name '{json kwargs}'` and adds `peak_rss_mb` (the whole process, interpreter and
imports included) and `baseline_rss_mb` (after imports, before the measurement).
"""

import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def best_time(fn, min_repeats: int = 1, min_seconds: float = 1.0, max_repeats: int = 20) -> tuple[float, int]:
    """Best wall time of `fn()` over repeats (at least `min_repeats`, until `min_seconds` have passed); the best is the
    least disturbed by other work on a shared machine. Returns (seconds, repeats)."""
    times, start = [], time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - start < min_seconds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), len(times)


def machine_info() -> dict:
    import numpy
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "load_average_at_start": os.getloadavg()[0],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def measure_in_subprocess(module: str, name: str, timeout: float = 600, **kwargs) -> dict:
    """Runs `benchmarks.<module>.<name>(**kwargs)` in a fresh interpreter; returns its dict plus RSS figures, or
    `{"error": ...}` when it failed (a benchmark failing is a result to show, not a reason to lose the others)."""
    cmd = [sys.executable, "-m", "benchmarks.common", module, name, json.dumps(kwargs)]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:300] if (proc.stderr or proc.stdout) else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(module: str, name: str, kwargs: str):
    fn = getattr(importlib.import_module(f"benchmarks.{module}"), name)
    import numpy  # noqa: F401  (the imports every measurement makes count in the baseline)
    import torch  # noqa: F401

    baseline = current_rss_mb()
    result = fn(**json.loads(kwargs))
    result.update(peak_rss_mb=round(peak_rss_mb(), 1), baseline_rss_mb=round(baseline, 1))
    print(json.dumps(result))


if __name__ == "__main__":
    _child(*sys.argv[1:4])
