"""The demo entry point: trains, samples both models from the same seeds, reports figures, and
writes the held-out reward curve; the family registry it reads; the curves' smoothing."""

import csv
import inspect
import json
import math
from types import SimpleNamespace

import diffusers  # noqa: F401  (the train extra: `make test` installs it; missing, these tests fail)
import numpy as np
import pytest
from helpers import needs_kernels
from PIL import Image

from fastpref import demo
from fastpref.demo_curve import CURVE_COLUMNS, curve_steps
from fastpref.tiny.sampling import guidance_kwargs
from fastpref.training import bundled
from fastpref.training.args import DEFAULT_DATA, DEFAULT_MODEL, default_data
from fastpref.training.family import family_class
from fastpref.training.logging import ema


@needs_kernels
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize(
    ("reference", "learning_rate", "weights"),
    [("lora", "0.05", "pytorch_lora_weights.safetensors"), ("copy", "0.001", "unet/config.json")],
)
def test_demo_reports_figures_writes_grid_and_heldout_curve(tmp_path, capsys, reference, learning_rate, weights):
    out = tmp_path / "demo"
    figures = demo.main(
        [
            "--family",
            "sd15",
            "--output_dir",
            str(out),
            "--max_train_steps",
            "2",
            "--curve_points",
            "2",
            "--curve_samples",
            "3",
            "--num_samples",
            "4",
            "--num_inference_steps",
            "5",
            "--train_batch_size",
            "2",
            "--reference",
            reference,
            "--learning_rate",
            learning_rate,  # large, so each checkpoint's samples differ from the reference's
        ]
    )
    assert figures["family"] == "sd15" and figures["num_samples"] == 4 and 0.0 <= figures["win_rate"] <= 1.0
    assert 0.0 < figures["reward_reference"] < 1.0 and 0.0 < figures["reward_trained"] < 1.0
    assert Image.open(out / "demo_grid.png").size[0] > 0
    assert (out / weights).is_file()
    flags = json.loads((out / "args.json").read_text())
    assert flags["pretrained_model_name_or_path"] == str(DEFAULT_MODEL) and flags["beta"] == demo.DEMO_BETA["dpo"]
    assert flags["checkpointing_steps"] == 1 and flags["reference"] == reference

    with open(out / "heldout_curve.csv") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CURVE_COLUMNS
        rows = list(reader)
    assert [int(r["step"]) for r in rows] == [0, 1, 2]  # reference, checkpoint-1, the final weights
    rewards = [float(r["reward_mean"]) for r in rows]
    assert all(0.0 < r < 1.0 for r in rewards)
    assert float(rows[0]["win_rate"]) == 0.5  # the reference against itself: every seed ties
    # checkpoint-1 and the final weights are sampled from their own weights, not the reference's or each other's
    assert len(set(rewards)) == 3
    assert rewards == pytest.approx([r["reward_mean"] for r in figures["heldout_curve"]], abs=1e-12)
    assert Image.open(out / "heldout_curve.png").size[0] > 0
    printed = capsys.readouterr().out
    assert "win-rate of trained over reference" in printed and "over 4 same-seed pairs" in printed
    assert "held-out reward by step (3 pairs)" in printed


@needs_kernels
@pytest.mark.filterwarnings("ignore::FutureWarning")
# wan: the video demo, with its own outputs (tests/test_demo_video.py)
@pytest.mark.parametrize("family", [f for f in bundled.available_families() if f not in ("sd15", "wan")])
def test_demo_runs_each_other_bundled_family(tmp_path, family):
    """Each family another branch bundles runs through the unchanged demo: its pipeline class
    samples, its saved LoRA loads, the curve is written (1 step, tiny sampling)."""
    out = tmp_path / family
    argv = ["--family", family, "--output_dir", str(out), "--max_train_steps", "1", "--num_samples", "2"]
    argv += ["--curve_samples", "2", "--num_inference_steps", "2", "--train_batch_size", "2"]
    figures = demo.main(argv)
    assert figures["family"] == family and 0.0 < figures["reward_trained"] < 1.0
    flags = json.loads((out / "args.json").read_text())
    assert flags["pretrained_model_name_or_path"] == str(bundled.BUNDLED_PIPELINES[family])
    with open(out / "heldout_curve.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [0, 1]


def test_demo_beta_only_for_its_loss_type_and_flags_override():
    def config(*argv):
        args, train_args = demo.build_parser().parse_known_args(["--output_dir", "unused", *argv])
        return demo.train_config(args, train_args, DEFAULT_MODEL)

    assert config().loss_type == "dpo" and config().beta == demo.DEMO_BETA["dpo"] == 200.0
    assert config().max_train_steps == 150 and config().checkpointing_steps == 30  # 5 curve points
    assert config("--beta", "5000").beta == 5000.0 and config("--learning_rate", "1e-3").learning_rate == 1e-3
    assert config("--loss_type", "dspo").beta is None  # DSPO's own default (0.001): another scale
    assert config("--max_train_steps", "7", "--curve_points", "2").checkpointing_steps == 3


def test_demo_family_registry_maps_each_available_family_to_its_pipeline_and_data():
    assert bundled.bundled_pipeline("sd15") == DEFAULT_MODEL
    available = bundled.available_families()
    assert available[0] == "sd15" and set(available) <= set(bundled.BUNDLED_PIPELINES)
    for name in available:  # the families other branches bundle are checked here once they land
        path = bundled.bundled_pipeline(name)
        assert family_class(path).class_names  # a registered trainer family reads it
        data = default_data(path)
        assert data.is_file() and (data == DEFAULT_DATA) == (name == "sd15")
    parser = demo.build_parser()
    assert parser.parse_known_args(["--family", "sd3"])[0].family == "sd3"
    assert all(name in parser.format_help() for name in bundled.BUNDLED_PIPELINES)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--family", "flux"], "--family: the bundled tiny flux pipeline is not in this installation"),
        (["--family", "sd2"], "--family: expected one of ['sd15', 'sdxl', 'sd3', 'flux', 'wan'], got 'sd2'"),
        (["--pretrained_model_name_or_path", "x"], "--pretrained_model_name_or_path: not a demo flag"),
        (["--curve_points", "0"], "--curve_points: expected an integer >= 1, got 0"),
        (["--num_samples", "0"], "--num_samples: expected an integer >= 1, got 0"),
    ],
)
def test_demo_refuses_bad_input_before_writing(tmp_path, monkeypatch, argv, message):
    monkeypatch.setitem(bundled.BUNDLED_PIPELINES, "flux", tmp_path / "absent-tiny-flux")
    out = tmp_path / "demo"
    with pytest.raises(ValueError) as error:
        demo.main(["--output_dir", str(out), *argv])
    assert message in str(error.value)
    if argv[1] in ("flux", "sd2"):  # a family refusal lists what is there
        assert "available" in str(error.value) and "'sd15'" in str(error.value)
    assert not out.exists()


def test_present_pipeline_without_its_data_is_not_available(tmp_path, monkeypatch):
    pipe = tmp_path / "tiny-sdxl"
    pipe.mkdir()
    (pipe / "model_index.json").write_text("{}")
    monkeypatch.setitem(bundled.BUNDLED_PIPELINES, "sdxl", pipe)
    assert "sdxl" not in bundled.available_families()
    monkeypatch.setitem(bundled.BUNDLED_DATA, pipe.resolve(), DEFAULT_DATA)
    assert "sdxl" in bundled.available_families() and bundled.bundled_pipeline("sdxl") == pipe


def test_ema_against_hand_computation():
    rng = np.random.default_rng()
    v = rng.normal(size=4).tolist()
    w = float(rng.uniform(0.1, 0.9))
    s1 = w * v[0] + (1 - w) * v[1]
    s3 = w * s1 + (1 - w) * v[3]  # v[2] missing: the average carries over
    got = ema([math.nan, v[0], v[1], math.nan, v[3]], w)
    assert math.isnan(got[0]) and got[1:] == pytest.approx([v[0], s1, s1, s3], rel=1e-15)
    assert ema(v, 0.0) == v
    with pytest.raises(ValueError, match=r"weight: expected a number in \[0, 1\), got 1.0"):
        ema(v, 1.0)


def test_curve_steps():
    assert curve_steps(10, 3) == [0, 3, 6, 9, 10]
    assert curve_steps(4, 2) == [0, 2, 4]
    assert curve_steps(1, 1) == [0, 1]


def test_guidance_kwargs_per_pipeline_signature():
    class Plain:  # SD1.5 / SDXL / SD3: guidance_scale
        def __call__(self, prompt, guidance_scale=7.5): ...

    class FluxLike:  # true classifier-free guidance unless the transformer embeds the guidance
        def __init__(self, guidance_embeds):
            self.transformer = SimpleNamespace(config=SimpleNamespace(guidance_embeds=guidance_embeds))

        def __call__(self, prompt, negative_prompt=None, true_cfg_scale=1.0, guidance_scale=3.5): ...

    assert "true_cfg_scale" in inspect.signature(FluxLike(False).__call__).parameters
    assert guidance_kwargs(Plain(), 2.5, 3) == {"guidance_scale": 2.5}
    assert guidance_kwargs(FluxLike(True), 2.5, 3) == {"guidance_scale": 2.5}
    assert guidance_kwargs(FluxLike(False), 2.5, 3) == {"true_cfg_scale": 2.5, "negative_prompt": ["", "", ""]}


def test_win_rate_counts_ties_half():
    assert demo.win_rate(np.array([1.0, 0.0, 0.5, 0.2]), np.array([0.0, 1.0, 0.5, 0.1])) == 0.625
