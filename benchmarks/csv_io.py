"""CSV schema (Liger-Kernel style), environment stamp, writing, reading and validation.

One row = one metric of one (kernel, provider, mode, dtype, shape, x) point. Quantile
columns hold p20/p50/p80 for time; metrics with a single value repeat it in all three.
A JSON sidecar ``<csv>.meta.json`` records the command, device, versions, the measured
device bandwidth and every skip note.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import sys

COLUMNS = [
    "kernel_name",
    "kernel_provider",
    "kernel_operation_mode",
    "metric_name",
    "metric_unit",
    "x_name",
    "x_value",
    "y_value_20",
    "y_value_50",
    "y_value_80",
    "dtype",
    "shape_name",
    "shape",
    "device",
    "torch_version",
    "triton_version",
    "cuda_version",
    "fastpref_version",
    "timestamp",
    "extra_benchmark_config_str",
]
NUMERIC = ["x_value", "y_value_20", "y_value_50", "y_value_80"]


def environment(device: str) -> dict:
    """Device name, library versions and a UTC timestamp for the CSV rows."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "missing"
    from providers import fastpref_version

    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {
        "device": name,
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "cuda_version": str(torch.version.cuda),
        "fastpref_version": fastpref_version(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


class CsvWriter:
    """Append rows to a CSV, flushing after each batch so a killed run keeps its rows."""

    def __init__(self, path: str, env: dict):
        self.path, self.env = path, env
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._f = open(path, "w", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=COLUMNS)
        self._w.writeheader()
        self.n = 0

    def add(
        self, *, kernel, provider, mode, metric, unit, x_name, x_value, y, dtype, shape_name, shape, extra: dict
    ) -> None:
        """Write one row; ``y`` is a float or a (p20, p50, p80) tuple."""
        q = tuple(y) if isinstance(y, (tuple, list)) else (y, y, y)
        row = {
            "kernel_name": kernel,
            "kernel_provider": provider,
            "kernel_operation_mode": mode,
            "metric_name": metric,
            "metric_unit": unit,
            "x_name": x_name,
            "x_value": x_value,
            "y_value_20": f"{q[0]:.6g}",
            "y_value_50": f"{q[1]:.6g}",
            "y_value_80": f"{q[2]:.6g}",
            "dtype": dtype,
            "shape_name": shape_name,
            "shape": "x".join(map(str, shape)),
            "extra_benchmark_config_str": json.dumps(extra, sort_keys=True),
            **self.env,
        }
        self._w.writerow(row)
        self.n += 1

    def flush(self) -> None:
        """Flush rows to disk."""
        self._f.flush()

    def close(self) -> None:
        """Close the file."""
        self._f.close()


def write_meta(csv_path: str, meta: dict) -> str:
    """Write the JSON sidecar next to the CSV and return its path."""
    path = csv_path + ".meta.json"
    with open(path, "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    return path


def read_meta(csv_path: str) -> dict:
    """Read the sidecar of ``csv_path`` (empty dict if absent)."""
    path = csv_path + ".meta.json"
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def read_rows(path: str) -> list[dict]:
    """Read a benchmark CSV; numeric columns become floats."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for c in NUMERIC:
            r[c] = float(r[c])
    return rows


def validate(path: str) -> list[dict]:
    """Read ``path`` and raise ``ValueError`` unless it has the schema's header, at least
    one row, finite numbers and p20 <= p50 <= p80 in every row. Returns the rows."""
    with open(path, newline="") as f:
        header = next(csv.reader(f))
    if header != COLUMNS:
        raise ValueError(f"{path}: header {header} != {COLUMNS}")
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"{path}: no rows")
    for i, r in enumerate(rows):
        vals = [r[c] for c in NUMERIC]
        if any(v != v or v in (float("inf"), float("-inf")) for v in vals):
            raise ValueError(f"{path}: row {i} has a non-finite value: {r}")
        if not (r["y_value_20"] <= r["y_value_50"] <= r["y_value_80"]):
            raise ValueError(f"{path}: row {i} quantiles out of order: {r}")
        for c in COLUMNS:
            if r[c] == "" and c not in ("extra_benchmark_config_str",):
                raise ValueError(f"{path}: row {i} has an empty {c}")
    return rows


def command_line() -> str:
    """The command that produced this run (python + argv), plus the wrapper that ran it
    when ``FASTPREF_BENCH_VIA`` says so (``run_gpu.sh`` sets it)."""
    cmd = " ".join(["python", *sys.argv])
    via = os.environ.get("FASTPREF_BENCH_VIA")
    return f"{cmd}  (via `{via}`)" if via else cmd
