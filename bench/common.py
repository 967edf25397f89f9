"""What every benchmark shares: timing, run metadata, result files.

GPU timings come from triton.testing.do_bench (median, p20, p80, in ms);
CPU timings from a warm-up followed by many timed repeats, also as
(median, p20, p80) in ms.
"""
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict, List

import torch


def time_cpu(fn: Callable[[], object], warmup: int = 3, repeats: int = 20) -> List[float]:
    """(median, p20, p80) milliseconds of fn() over `repeats` calls after `warmup`."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(samples, n=10)
    return [statistics.median(samples), q[1], q[7]]


def time_gpu(fn: Callable[[], object]) -> List[float]:
    import triton.testing

    return list(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8]))


def run_info() -> Dict[str, str]:
    """Device, versions, git sha and date recorded with every result row."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        sha = ""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_sha": sha or "unknown",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        import triton

        info["device"] = torch.cuda.get_device_name()
        info["triton"] = triton.__version__
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return info


def write_json(path: str, info: Dict[str, str], rows: List[dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"run": info, "rows": rows}, f, indent=1)
    os.replace(tmp, path)
