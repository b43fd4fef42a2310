"""The captured training step on a CUDA GPU: replays match the eager step, make no host sync,
and ``--cuda_graph`` trains every precision and reference mode end to end, each mode's replays
compared with an eager twin run (tests/graph_twins.py). The CPU checks of the same
static-buffer step, and of the twin comparison itself, are in test_train_static_step.py."""

import csv
import math
import shutil

import diffusers  # noqa: F401  (the train extra: `make test` installs it; missing, these tests fail)
import pytest
import torch
from graph_twins import TOLERANCES, assert_twins_agree, graph_step, run_trainer
from safetensors.torch import load_file
from train_helpers import FAST, tiny_step

from fastpref import train
from fastpref.training.args import DEFAULT_DATA
from fastpref.training.batches import paired_batch
from fastpref.training.data import PreferencePairs, parquet_files
from fastpref.training.graph import WARMUP_STEPS, StaticStep

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
pytestmark = [pytestmark, pytest.mark.filterwarnings("ignore::FutureWarning")]


def _rows(out):
    with open(out / "metrics.csv") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


@pytest.mark.parametrize("loss_type", ["dpo", "dspo_sdxl"])
def test_replayed_steps_match_eager_steps_without_host_sync(loss_type):
    pairs = PreferencePairs(parquet_files(DEFAULT_DATA))
    params_e, eager, sched_e, enc = tiny_step(CUDA, True, loss_type)
    params_g, inner, sched_g, _ = tiny_step(CUDA, True, loss_type)
    graphed = StaticStep(inner, use_graph=True)
    for step in range(WARMUP_STEPS + 3):
        batches = [paired_batch(pairs, list(range(4 * step + 2 * m, 4 * step + 2 * m + 2)), enc) for m in range(2)]
        out_e = eager(batches)
        torch.cuda.synchronize()
        captured = graphed.graph is not None
        if captured:  # replays (and the input copies) make no host sync
            torch.cuda.set_sync_debug_mode("error")
        try:
            out_g = graphed(batches)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert (graphed.graph is not None) == (step >= WARMUP_STEPS)
        for key in out_e:
            torch.testing.assert_close(out_g[key], out_e[key], rtol=1e-4, atol=1e-6, msg=f"step {step} {key}")
        sched_e.step()
        sched_g.step()
    assert captured
    for a, b in zip(params_e, params_g, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_cuda_graph_run_matches_eager_run(tmp_path, monkeypatch):
    replays = []
    original = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: (replays.append(1), original(self))[1])
    common = [
        *FAST,
        "--train_batch_size",
        "2",
        "--max_train_steps",
        "6",
        "--gradient_accumulation_steps",
        "2",
        "--lr_scheduler",
        "linear",
        "--lr_warmup_steps",
        "2",
        "--report_to",
        "csv",
        "--checkpointing_steps",
        "6",
    ]
    train.main([*common, "--output_dir", str(tmp_path / "eager")])
    assert not replays
    train.main([*common, "--output_dir", str(tmp_path / "graph"), "--cuda_graph"])
    assert len(replays) == 6 - WARMUP_STEPS
    eager, graph = _rows(tmp_path / "eager"), _rows(tmp_path / "graph")
    for r_e, r_g in zip(eager, graph, strict=True):
        for key in ("loss", "model_mse", "ref_mse", "grad_norm", "lr"):
            assert r_g[key] == pytest.approx(r_e[key], rel=1e-3, abs=1e-6), (r_e["step"], key)
    a = load_file(tmp_path / "eager" / "checkpoint-6" / "trainable.safetensors")
    b = load_file(tmp_path / "graph" / "checkpoint-6" / "trainable.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(
    "precision,reference,loss_type",
    [
        ("bf16", "lora", "dpo"),
        ("bf16", "copy", "sspo"),
        ("fp16", "lora", "kto"),
        ("fp16", "copy", "mapo"),
        ("bf16", "lora", "rpo"),
        ("no", "lora", "dense_dpo"),
    ],
)
def test_cuda_graph_trains_every_precision_and_reference(tmp_path, monkeypatch, precision, reference, loss_type):
    """Every precision (fp16: forward and backward captured, the scaler's step eager), both
    reference modes, SSPO's replayed reference weights, KTO's labels and RPO's prompt weights:
    the replays take the steps of an eager twin, the same run whose StaticStep is called on its
    static buffers without capture (same optimizer, autocast and fresh batches every step), by
    ``graph_twins.assert_twins_agree``: per step the prediction errors, loss and grad_norm, each
    replay told apart from every earlier step's inputs, and the final weights."""
    replays = []
    original = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: (replays.append(1), original(self))[1])
    argv = [
        *FAST,
        "--train_batch_size",
        "2",
        "--max_train_steps",
        str(WARMUP_STEPS + 3),
        "--cuda_graph",
        "--mixed_precision",
        precision,
        "--reference",
        reference,
        "--loss_type",
        loss_type,
        "--report_to",
        "csv",
        "--checkpointing_steps",
        "2",
        "--sspo_sample_steps",
        "2",
        "--sspo_snapshot_steps",
        "2",
    ]
    graphed = run_trainer(argv, tmp_path / "run")
    rows = graphed.rows
    assert len(rows) == WARMUP_STEPS + 3 and all(math.isfinite(r["loss"]) for r in rows)
    mse = next(k for k in rows[0] if k.startswith("model_mse"))  # KTO's loss can repeat when saturated
    assert len({r[mse] for r in rows[WARMUP_STEPS:]}) == 3  # replays see each step's new inputs
    assert len(replays) == 3
    twin = run_trainer(argv, tmp_path / "twin", static_step=graph_step(False))
    assert len(replays) == 3, "the eager twin replayed a graph"
    assert_twins_agree(graphed, twin, TOLERANCES[precision], first=WARMUP_STEPS)


def test_cuda_graph_resumes_from_a_checkpoint(tmp_path):
    common = [
        *FAST,
        "--train_batch_size",
        "2",
        "--cuda_graph",
        "--report_to",
        "csv",
        "--checkpointing_steps",
        "4",
        "--lr_scheduler",
        "cosine",
        "--lr_warmup_steps",
        "1",
    ]
    train.main([*common, "--max_train_steps", "8", "--output_dir", str(tmp_path / "straight")])
    # the same 8-step run stopped after checkpoint-4 (a resume may not stretch a cosine schedule)
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoint-8")
    train.main(
        [
            *common,
            "--max_train_steps",
            "8",
            "--output_dir",
            str(tmp_path / "resumed"),
            "--resume_from_checkpoint",
            "latest",
        ]
    )
    straight, resumed = _rows(tmp_path / "straight"), _rows(tmp_path / "resumed")
    for r_s, r_r in zip(straight, resumed, strict=True):
        assert r_r["lr"] == pytest.approx(r_s["lr"], rel=1e-6)
        assert r_r["loss"] == pytest.approx(r_s["loss"], rel=1e-3, abs=1e-6)


def test_gradient_checkpointing_in_the_graph_is_refused(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="--cuda_graph with --gradient_checkpointing: refused"):
        train.main([*FAST, "--cuda_graph", "--gradient_checkpointing", "--output_dir", str(out)])
    assert not out.exists()
