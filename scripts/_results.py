"""CSV rows for bench/results/, in the column layout bench/report.py reads.

Used by the model-level GPU scripts (bench_minilm.py, bench_fill_holes.py); one
row per measurement, quantiles p50/p20/p80 of the repeated timings.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import platform
import subprocess
from pathlib import Path

import numpy as np
import torch

COLUMNS = ["kernel", "provider", "workload", "x", "metric", "unit", "p50", "p20", "p80",
           "tflops", "gpu", "torch", "triton", "commit", "date", "note"]
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def environment() -> dict[str, str]:
    """gpu, torch, triton, commit and date: the columns every row shares."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu-{platform.machine()}"
    commit = os.environ.get("SPANFILL_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, cwd=RESULTS.parent, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = ""
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton_version,
            "commit": commit or "unknown",
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def quantiles(values: list[float]) -> dict[str, float]:
    """p50, p20 and p80 of ``values``."""
    p20, p50, p80 = np.percentile(np.asarray(values, dtype=np.float64), [20, 50, 80])
    return {"p50": float(p50), "p20": float(p20), "p80": float(p80)}


def new_figure(width: float, height: float):
    """A matplotlib figure and axes on the Agg backend (no display on the GPU machine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def save_figure(fig, path: Path) -> Path:
    """Lay out, write ``fig`` to ``path`` as a PNG and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` (missing columns left empty) to ``path``, with the environment."""
    env = environment()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, env.get(c, "")) for c in COLUMNS})
    return path
