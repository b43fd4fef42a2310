"""Training metrics: CSV (always), TensorBoard (when installed) and a PNG of the curves."""

import csv
import math
import warnings
from pathlib import Path

SMOOTHING = 0.9  # EMA weight of the plotted curves (raw values in metrics.csv and faint in the plot)


def ema(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average ``s_i = weight * s_{i-1} + (1 - weight) * v_i``, ``s_0 = v_0``
    (the first finite value); a NaN entry (a step that did not log the metric) keeps the previous
    average, NaN before any finite value. ``weight`` in [0, 1): 0 returns the values."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"weight: expected a number in [0, 1), got {weight}")
    out, average = [], math.nan
    for value in values:
        if not math.isnan(value):
            average = value if math.isnan(average) else weight * average + (1.0 - weight) * value
        out.append(average)
    return out


def _row(record: dict[str, str]) -> dict:
    """A metrics.csv row as logged: ``step`` an int, the other metrics floats; a metric that row
    did not log (an empty cell: csv.DictWriter's filler) is left out."""
    return {k: int(float(v)) if k == "step" else float(v) for k, v in record.items() if v not in ("", None)}


class MetricsLogger:
    """Appends one row of scalars per optimizer step; rank 0 only.

    ``resume_step`` > 0 (a resumed run, possibly from an earlier checkpoint than the newest):
    metrics.csv keeps its rows up to that step only, and TensorBoard purges the events after it
    (``SummaryWriter(purge_step=resume_step + 1)``), so each step appears once in both."""

    def __init__(self, output_dir: str | Path, report_to: str, resume_step: int = 0):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.dir / "metrics.csv"
        self.rows: list[dict] = []
        if resume_step and self.csv_path.exists():  # keep the rows up to the resumed step
            with open(self.csv_path) as f:
                self.rows = [row for row in map(_row, csv.DictReader(f)) if row["step"] <= resume_step]
        self.tensorboard = None
        if report_to in ("tensorboard", "all"):
            try:
                from torch.utils.tensorboard import SummaryWriter

                # events of steps > resume_step, written by the run after its checkpoint, are purged
                self.tensorboard = SummaryWriter(
                    str(self.dir / "logs"), purge_step=resume_step + 1 if resume_step else None
                )
            except ImportError:
                warnings.warn(
                    "--report_to tensorboard: tensorboard is not installed; logging to metrics.csv only", stacklevel=2
                )

    def log(self, step: int, values: dict[str, float]) -> None:
        """Record ``values`` at optimizer step ``step`` (merged into the last row when it is the
        same step's: the on-line refresh logs after the step's own metrics)."""
        if self.rows and self.rows[-1]["step"] == step:
            self.rows[-1].update(values)
        else:
            self.rows.append({"step": step, **values})
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(f"train/{key}", value, step)

    def flush(self) -> None:
        """Rewrite metrics.csv with every row so far (called at checkpoints and at the end)."""
        if not self.rows:
            return
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.csv_path)
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        """Write metrics.csv and curves.png and close TensorBoard."""
        self.flush()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if not self.rows:
            return
        self.plot(list(dict.fromkeys(k for r in self.rows for k in r)))

    def plot(self, keys: list[str]) -> None:
        """One panel per metric against step, saved as curves.png: the raw per-step values faint,
        their EMA (``ema``, weight ``SMOOTHING``) on top."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [k for k in keys if k != "step"]
        columns = min(4, len(names))
        rows = -(-len(names) // columns)
        fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False)
        steps = [r["step"] for r in self.rows]
        for ax, name in zip(axes.flat, names, strict=False):
            logged = [r for r in self.rows if name in r]
            if 2 * len(logged) <= len(self.rows):  # a metric of a few steps (online_reward): its points, unsmoothed
                ax.plot([r["step"] for r in logged], [r[name] for r in logged], color="C1", marker="o")
                ax.set_title(name)
                ax.set_xlabel("step")
                continue
            values = [r.get(name, float("nan")) for r in self.rows]
            ax.plot(steps, values, color="C0", alpha=0.3, linewidth=0.8)
            ax.plot(steps, ema(values), color="C0", linewidth=1.6)
            ax.set_title(f"{name} (EMA {SMOOTHING:g})")
            ax.set_xlabel("step")
        for ax in list(axes.flat)[len(names) :]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(self.dir / "curves.png", dpi=80)
        plt.close(fig)
