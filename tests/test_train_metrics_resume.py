"""Metrics of a resumed run: each step once in metrics.csv and in TensorBoard's events, also
after a resume from an earlier checkpoint than the newest (the rows and events of the steps
after it, written by the first run, are dropped)."""

import csv

import pytest

from fastpref.training.logging import MetricsLogger


def _log(logger, steps, **extra):
    for step in steps:
        logger.log(step, {"loss": 1.0 / step, **extra})


def _csv_steps(path):
    with open(path / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def test_csv_resumed_from_an_earlier_checkpoint_has_each_step_once(tmp_path):
    first = MetricsLogger(tmp_path, "csv")
    first.log(1, {"loss": 1.0, "replayed_step": 0.0})  # a metric only some rows have: an empty cell
    _log(first, range(2, 7))
    first.close()
    resumed = MetricsLogger(tmp_path, "csv", resume_step=2)  # checkpoint-2 of a run that reached step 6
    assert [r["step"] for r in resumed.rows] == [1, 2]
    assert "replayed_step" not in resumed.rows[1]  # the empty cell is not a value
    _log(resumed, range(3, 7))
    resumed.close()
    assert _csv_steps(tmp_path) == [1, 2, 3, 4, 5, 6]


def test_tensorboard_resumed_from_an_earlier_checkpoint_has_each_step_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = MetricsLogger(tmp_path, "tensorboard")
    _log(first, range(1, 7))
    first.close()
    resumed = MetricsLogger(tmp_path, "tensorboard", resume_step=2)
    _log(resumed, range(3, 7))
    resumed.close()
    events = EventAccumulator(str(tmp_path / "logs"))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [s.step for s in scalars] == [1, 2, 3, 4, 5, 6]
    assert [s.value for s in scalars] == pytest.approx([1.0 / s for s in range(1, 7)])
