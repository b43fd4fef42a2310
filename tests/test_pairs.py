"""fastpref-pairs on the bundled tiny pipeline: the written set (layout, labels, scores, seeds,
regeneration), a resume after a real kill, the refusals before any work, and the pairing rules."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from pairs_helpers import BLOCK_AFTER, FAST_PAIRS
from PIL import Image

from fastpref.pairs import cli
from fastpref.pairs.generate import sample_seed
from fastpref.pairs.sampling import load_pipeline, sample_images
from fastpref.pairs.select import label_0, select_pairs
from fastpref.pairs.writer import read_spec
from fastpref.training.args import BUNDLED_DATA, DEFAULT_MODEL
from fastpref.training.config import parse_config
from fastpref.training.data import PreferencePairs, parquet_files
from fastpref.training.family import family_class
from fastpref.training.validation import validate

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle", "a purple square", "a red square"]


def write_prompts(path, prompts=PROMPTS):
    path.write_text("\n".join(prompts) + "\n\n")  # a trailing blank line is skipped
    return path


def chroma64(images: np.ndarray) -> np.ndarray:
    """Colourfulness in float64, written out here: mean over pixels of max - min of R, G, B."""
    x = images.astype(np.float64) / 255.0
    return (x.max(-1) - x.min(-1)).mean(axis=(1, 2))


def decode(blob: bytes) -> np.ndarray:
    import io

    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))


def test_pairs_from_the_tiny_pipeline_are_audited_and_regenerable(tmp_path):
    out = tmp_path / "pairs.parquet"
    prompts = write_prompts(tmp_path / "prompts.txt")
    argv = ["--prompts", str(prompts), "--num_samples", "3", "--part_size", "4", "--image_format", "png"]
    summary = cli.main([*argv, *FAST_PAIRS, "--output", str(out), "--seed", "5"])
    table = pq.read_table(out).to_pydict()
    assert not (tmp_path / "pairs.parquet.parts").exists()  # parts merged and removed
    assert summary["pairs"] == len(table["caption"]) == len(PROMPTS)  # best vs worst: one pair per prompt
    assert table["prompt_index"] == list(range(len(PROMPTS)))
    assert table["caption"] == PROMPTS
    for i in range(len(PROMPTS)):
        image_0, image_1 = decode(table["jpg_0"][i]), decode(table["jpg_1"][i])
        s0, s1 = chroma64(np.stack([image_0, image_1]))
        assert (table["score_0"][i], table["score_1"][i]) == pytest.approx((s0, s1), rel=1e-12)
        assert table["label_0"][i] == (1.0 if s0 > s1 else 0.0) and s0 != s1
        seeds = [sample_seed(5, i, k) for k in range(3)]
        assert table["seed_0"][i] in seeds and table["seed_1"][i] in seeds
        assert seeds.index(table["seed_0"][i]) < seeds.index(table["seed_1"][i])  # kept in sample order
    # the spec in the file regenerates a pair: the stored seed and prompt give the stored image (PNG: lossless)
    spec = read_spec(out)
    assert spec["num_samples"] == 3 and spec["seed"] == 5 and spec["reward"] == "colourfulness"
    pipe = load_pipeline(DEFAULT_MODEL)
    again = sample_images(pipe, [table["caption"][2]], [table["seed_1"][2]], num_inference_steps=4)
    np.testing.assert_array_equal(again[0], decode(table["jpg_1"][2]))
    # the trainer reads it; and a rerun of the same command is a no-op that keeps the file
    assert len(PreferencePairs(parquet_files(out))) == len(PROMPTS)
    before = out.stat().st_mtime_ns
    (tmp_path / "pairs.parquet.parts").mkdir()  # as a kill after the final rename leaves it
    assert cli.main([*argv, *FAST_PAIRS, "--output", str(out), "--seed", "5"])["prompts_now"] == 0
    assert out.stat().st_mtime_ns == before and not (tmp_path / "pairs.parquet.parts").exists()


def test_resume_after_a_kill_writes_no_duplicate_or_torn_row(tmp_path):
    prompts = write_prompts(tmp_path / "prompts.txt")
    argv = ["--prompts", str(prompts), "--num_samples", "2", "--part_size", "1", *FAST_PAIRS]
    argv += ["--reward", "pairs_helpers:blocking_colourfulness"]
    killed, parts = tmp_path / "killed.parquet", tmp_path / "killed.parquet.parts"
    tests = os.path.dirname(__file__)
    env = {**os.environ, "OMP_NUM_THREADS": "1", BLOCK_AFTER: "2", "PYTHONPATH": tests}
    proc = subprocess.Popen(  # writes parts 0 and 1, then hangs in the reward of part 2
        [sys.executable, "-m", "fastpref.pairs.cli", *argv, "--output", str(killed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 120
        while len(list(parts.glob("part-*.parquet"))) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.2)  # well inside the hang
        proc.send_signal(signal.SIGKILL)
    finally:
        _, err = proc.communicate()
    done = sorted(p.name for p in parts.glob("part-*.parquet"))
    assert done == ["part-00000000-00000001.parquet", "part-00000001-00000002.parquet"], err.decode()[-2000:]
    assert not killed.exists()
    (parts / ".tmp-part-00000002-00000003.parquet").write_bytes(b"PAR1 torn")  # a part cut mid-write
    resumed = cli.main([*argv, "--output", str(killed)])
    assert (resumed["prompts_before"], resumed["prompts_now"]) == (2, len(PROMPTS) - 2)
    fresh = tmp_path / "fresh.parquet"
    cli.main([*argv, "--output", str(fresh)])
    a, b = pq.read_table(killed), pq.read_table(fresh)
    assert a.column("prompt_index").to_pylist() == list(range(len(PROMPTS)))  # each prompt once, in order
    assert a.equals(b)  # the same rows, byte for byte, as an uninterrupted run


def test_refusals_come_before_any_work(tmp_path):
    prompts = write_prompts(tmp_path / "prompts.txt")
    out = tmp_path / "out.parquet"
    base = ["--prompts", str(prompts), "--output", str(out), *FAST_PAIRS]
    cases = [
        (["--num_samples", "1"], "--num_samples: expected an integer >= 2, got 1"),
        (["--min_margin", "nan"], "--min_margin: expected a finite number >= 0"),
        (["--reward", "nope"], "--reward: expected one of"),
        (["--reward", "clip"], "--reward clip needs a CLIP model on local disk"),
        (["--prompts", str(tmp_path / "missing.txt")], "--prompts: expected a prompts file"),
        (
            ["--pretrained_model_name_or_path", str(tmp_path)],
            "--pretrained_model_name_or_path: expected a local diffusers",
        ),
        (["--resolution", "30"], "--resolution: expected a multiple of the VAE downsampling factor 4, got 30"),
        (["--prompt_column", "prompt"], "--prompt_column: .* is a text file"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            cli.main([*base, *extra])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.txt"]  # nothing written
    # another run's unfinished parts, and an existing output of other settings, are refused
    (tmp_path / "out.parquet.parts").mkdir()
    (tmp_path / "out.parquet.parts" / "spec.json").write_text('{"seed": 1}')
    with pytest.raises(ValueError, match="unfinished run with other settings .*seed: 1 -> 0"):
        cli.main(base)
    out.write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="--output: .* exists and is not a fastpref-pairs file.*--overwrite"):
        cli.main(base)


def test_prompts_from_parquet_and_csv_columns(tmp_path):
    import pyarrow as pa

    from fastpref.pairs.prompts import read_prompts

    pq.write_table(pa.table({"id": [1, 2], "caption": ["a red circle", "a blue square"]}), tmp_path / "p.parquet")
    assert read_prompts(tmp_path / "p.parquet") == ["a red circle", "a blue square"]
    (tmp_path / "p.csv").write_text("text,other\na red circle,1\na blue square,2\n")
    assert read_prompts(tmp_path / "p.csv", "text") == ["a red circle", "a blue square"]
    with pytest.raises(ValueError, match="has no column 'nope'; its columns are"):
        read_prompts(tmp_path / "p.csv", "nope")
    pq.write_table(pa.table({"prompt": ["a", None]}), tmp_path / "n.parquet")
    with pytest.raises(ValueError, match="row 1 is None, not a string"):
        read_prompts(tmp_path / "n.parquet")


def test_select_pairs_best_worst_all_and_margin():
    rng = np.random.default_rng(11)
    for _ in range(20):
        s = rng.normal(size=5)
        ((a, b),) = select_pairs(s, "best_worst")
        assert {a, b} == {int(np.argmax(s)), int(np.argmin(s))} and a < b
        every = select_pairs(s, "all", min_margin=0.5)
        assert every == [(i, j) for i in range(5) for j in range(i + 1, 5) if abs(s[i] - s[j]) > 0.5]
    assert select_pairs(np.array([0.3, 0.3]), "best_worst") == []  # a tie is no pair by default
    assert select_pairs(np.array([0.3, 0.3]), "best_worst", min_margin=None) == [(0, 1)]  # the tiny set keeps it
    assert select_pairs(np.array([0.1, 0.5, 0.2]), "best_worst", min_margin=0.4) == []  # margin 0.4 not > 0.4
    assert [label_0(1, 0), label_0(0, 1), label_0(2, 2)] == [1.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="--pairing"):
        select_pairs(np.zeros(3), "pairs")
    assert torch.Generator  # the tests run with torch imported (the sampler's generators)


# the video pipeline (tiny-wan) writes the video index: tests/test_pairs_video.py
IMAGE_PIPELINES = [p for p in sorted(BUNDLED_DATA) if family_class(p).media == "images"]


@pytest.mark.parametrize("pipeline", IMAGE_PIPELINES, ids=lambda p: p.name)
def test_pairs_from_every_bundled_pipeline_train(pipeline, tmp_path):
    """Every bundled tiny pipeline (each family the trainer has one for) gives a set that
    fastpref-train reads for that pipeline, its scores those of the stored images."""
    out = tmp_path / "pairs.parquet"
    prompts = write_prompts(tmp_path / "prompts.txt", PROMPTS[:3])
    argv = ["--pretrained_model_name_or_path", str(pipeline), "--prompts", str(prompts), "--num_samples", "2"]
    cli.main([*argv, *FAST_PAIRS, "--num_inference_steps", "2", "--min_margin", "0", "--output", str(out)])
    table = pq.read_table(out).to_pydict()
    assert 1 <= len(table["caption"]) <= 3 and read_spec(out)["model"] == str(pipeline.resolve())
    for blob, score in zip(table["jpg_0"] + table["jpg_1"], table["score_0"] + table["score_1"], strict=True):
        assert score == pytest.approx(chroma64(decode(blob)[None])[0], rel=1e-12)
    _, _, pairs, _ = validate(
        parse_config(pretrained_model_name_or_path=str(pipeline), dataset_name=str(out), report_to="none")
    )
    assert len(pairs) == len(table["caption"])
